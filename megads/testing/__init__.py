"""Test and benchmark harnesses (not used by training itself).

    megads.testing.parallel        spawn real gloo ranks, tiny model, single-process reference
    megads.testing.schedule_check  every pipeline schedule against one process, on real ranks
    megads.testing.data            small corpora and tokenizers for the data-pipeline tests
    megads.testing.launch          the trainer CLI as a user runs it (torchrun), worker pids
    megads.testing.soak            RSS, fds and threads of running ranks, sampled from outside
"""
