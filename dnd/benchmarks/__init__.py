"""Benchmarks: apps that measure dnd and write the tables in ``results/``.

One module per benchmark, each with a ``write_*`` function that runs it and writes its
table through the one table writer (:mod:`.common`); :mod:`.cli` registers them as
``dnd bench NAME``, with ``dnd tables`` (:mod:`.tables`: the paper's evaluation suites and
the toy-world tables of ``eval/tables.yaml``) and ``dnd demo`` (:mod:`.demo`).

- speed and scale: :mod:`.activations`, :mod:`.describe` (with the per-unit baseline and
  the latency server of :mod:`.latency_server`), :mod:`.selection`, :mod:`.paper_scale`,
  :mod:`.ray_executor`;
- description quality on the toy world's ground truth: :mod:`.toyworld`,
  :mod:`.planted` (runs and tables; judged by :mod:`.planted_judging`), :mod:`.dictionary`,
  :mod:`.featurevis`, :mod:`.textvis`, :mod:`.explain`.

They live in the installed package because ``dnd bench``, ``dnd tables`` and ``dnd demo``
are commands of the installed tool; nothing in dnd imports them but the command line. The
toy world (:mod:`dnd.toyworld`) provides their world, models and ground truth as a plug-in.
"""
