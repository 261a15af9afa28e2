"""Sequence parallelism (docs/long_sequences.md): DeepSpeed-Ulysses' DistributedAttention
(zeal.sequence.layer), the sequence-sharded losses (zeal.sequence.cross_entropy), ring attention
over the mesh's ring axis and its hierarchical composition with Ulysses (zeal.sequence.ring).

The groups come from the mesh (zeal.mesh.build(sequence=S[, ring=R])); DeepSpeed's accessors
(zeal.utils.groups._get_sequence_parallel_group() ...) answer from the same mesh."""
