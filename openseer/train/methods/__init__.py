"""Training methods the one loop (train/loop.py) runs: each a builder and a method object.

A builder (``SwAVTraining``, ``DistillTraining``, ``FinetuneTraining``) is made once per run, ``Builder(cfg, env, device)``,
after the run directory was checked and before the data is opened (what can fail early fails
there: a teacher that does not load, a queue that does not split over the ranks). It has

  ``name``                      the label of the run's progress and log lines ("pretrain", "distill", "finetune")
  ``build_model() -> Module``   the trained module on the device (the loop seeds the RNG just before)
  ``build_method(model, autocast) -> method``  once the loop has wrapped ``model`` (DDP/FSDP)
  ``describe() -> str``         what the run's first line says of the method ("" when nothing)
  ``collection()`` (optional)   the images to train on, instead of the config's ``data.source``, with ``brings_images = True``
                                (finetune: the labelled images, whatever collection they came from)

A method object (train/step.py says what ``train_step`` calls) also owns the state a checkpoint
needs besides the model and optimiser: ``state_dict() -> dict`` (top-level checkpoint entries,
e.g. SwAV's ``queue``) and ``load_state_dict(state, path)``; and the columns it adds to a metrics
row, ``row(means) -> dict``, and ``collapse_loss`` (a loss level that means collapse, or None).
A method with ``takes_keys = True`` gets the batch's image keys, ``forward_backward(..., keys=)`` (a
supervised method looks its labels up by key), and a model with ``optim_groups()`` gives the optimiser
its parameter groups, each trained at ``lr_scale`` times the schedule's LR (finetune: a slower backbone).
"""
