"""The ops models and the trainer call, and which implementation serves each: the op table (:mod:`.table`),
the torch references (:mod:`.reference`), backend selection (:mod:`.select`), FlexAttention for packed
documents on CUDA (:mod:`.flex`) and the measured ``auto`` (:mod:`.tune`)."""
