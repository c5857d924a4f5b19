"""Teacher actor pools against a teacher inside the student's step, on the same machine.

    python -m benchmarks.pools                  # the CPU matrix; writes its section of benchmarks/RESULTS.md
    python -m benchmarks.pools --gpu            # real widths in bf16 on one GPU (needs CUDA)
    python -m benchmarks.pools --gpu --dry-run  # what --gpu would run, and its code path at tiny width on CPU

Four ways of feeding the student a teacher's signal, with the tiny student (0.29M) and teachers
of 5.7M (`tiny-teacher`) and 25.7M (`small-teacher`), all in one Ray session:

* (a) co-resident: each student worker loads the teacher and runs its forward inside every
  training step, as other KD tools do (benchmark-only code: `worker.CoResidentTeacher`);
* (b) streamed pool: the teacher's actor pool as a Ray Data stage feeding the Train workers
  while they train (signal cache off);
* (c) cached: one pool pass into the signal cache, then the student trains on it; its rate pays
  the pass;
* (d) the limit: the student on precomputed signal held in the object store.

Every run is a real DFT step (`run_one_step`, DeepSpeed ZeRO-2, 2 workers) on the bundled
benchmark, read and preprocessed 32 records at a time (one optimizer step's worth: a pool
stage hands its output on one block at a time, see `matrix.STREAM_BLOCK`). Per run: the student's samples/s after its first batch
arrived (rank 0's training and data-wait seconds; for (c) the teacher pass added) and over the
whole run (the first batch's wait, where a streamed pool's start lands, counted too), its share
waiting for data, the peak private memory (RssAnon) of the largest student worker process, the
most teacher actors alive at once, and the signal bytes per sample its decoder saw. Medians over
`--runs` runs, min-max beside. Teachers and student have random weights: speed and memory do not
depend on them.
"""
