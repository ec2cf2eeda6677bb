"""Checkpoints, in layers; each module imports only the ones listed before it.

- :mod:`layout`: the files of a checkpoint without torch (names, ``latest``, manifests, fork records,
  checksums), what ``lrpath status`` reads;
- :mod:`dist_files`: dist checkpoint files read and written directly, without a model (merge, Hugging
  Face import and export);
- :mod:`write_requests`: megatron-core's asynchronous write requests, the one place that reads their layout;
- :mod:`tensors`: dist-checkpointing save and load of a live model and optimizer, stage and commit;
- :mod:`writer_process`: the background writer process of one rank;
- :mod:`writer`: writing in the foreground or the background, and a failed write as one message;
- :mod:`policy`: the checkpoint policy of one path, which the trainer asks.

Nothing is imported here: importing a module of the package loads only what that module needs.
"""
