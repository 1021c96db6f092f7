"""Optimizers: building the one a recipe names (:mod:`.build`), torch-side Muon (:mod:`.muon`) and Lion
(:mod:`.lion`), Muon's work shared over the ranks of a DDP or FSDP2 run (:mod:`.sharing`)."""
