"""Test and benchmark harnesses (not used by training itself).

    megads.testing.parallel        spawn real gloo ranks, tiny model, single-process reference
    megads.testing.schedule_check  every pipeline schedule against one process, on real ranks
    megads.testing.data            small corpora and tokenizers for the data-pipeline tests
"""
