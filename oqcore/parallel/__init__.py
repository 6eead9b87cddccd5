"""Tensor- and expert-parallel online loading on torch.distributed (see :func:`oqcore.load`'s
``mesh`` / ``parallel`` arguments): the plan (:mod:`.plan`), each rank's cut of a layer
(:mod:`.shard`, :mod:`.localize`), its slices of the checkpoint (:mod:`.sources`), the amax and
status collectives (:mod:`.comm`) and the forward's collectives (:mod:`.forward`)."""
