"""Optimizers and what drives them: building the one a recipe names (:mod:`.build`), the learning-rate
schedule (:mod:`.schedule`), torch-side Muon (:mod:`.muon`) and Lion (:mod:`.lion`), and Muon's work shared
over the ranks of a DDP or FSDP2 run (:mod:`.sharing`)."""
