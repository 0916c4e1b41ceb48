"""Training data: JSONL samples, mixtures, labels, packing, loading. No torch.distributed.

    samples.py   JSONL / JSON-list files indexed by byte span; records validated (RawSample)
    mixture.py   the official mixture YAML: per-file ratio/num selection, seeded epoch order,
                 the split over data-parallel ranks and loader workers
    encode.py    records -> EncodedSample through the one Processor; bad samples -> skips
    packing.py   greedy bins (per source / across sources) and PackedSequence tensors
    stream.py    one loader worker's resumable stream of packed sequences
    loader.py    DataConfig and PackedLoader (torch DataLoader, workers, exact resume)
    stats.py     skip reasons, SampleError, DataStats (epoch summaries)
    inspect.py   `longvita data inspect`
    packed.py    PackedSequence, the hand-off to the model step

See docs/data.md. Submodules are imported explicitly (this package imports nothing), so that
`longvita.data.packed` stays cheap for the model side.
"""
