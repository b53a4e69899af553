"""Training for ATST encoders: ATST-Frame / ATST-Clip pretraining, clip-level fine-tuning and ATST-C2F.

Run it as ``python -m atst_features.train frame|clip|finetune|c2f ...`` or
``atst-features train ...``; several GPUs and several nodes through ``torchrun``.
The core library never imports this package; it uses the same ``ATSTEncoder`` from ``model.py``.

Modules, in the order data flows through them:

- ``config``: the run configuration (a frozen dataclass) and the official recipes (one table for
  fine-tuning and C2F);
- ``data``: file lists, labelled CSVs, random crops decoded in DataLoader workers (a file that fails
  is replaced and reported), a resumable sampler;
- ``scan``: the data scan before step 1 (unusable files skipped and reported, cached per corpus);
- ``augment``: mixup with a memory, random-resize-crop, block masking (all on the training device);
- ``heads``: BYOL projector / predictor and the linear classification head;
- ``tasks``: the four objectives (BYOL frame / clip, classification, C2F distillation);
- ``schedules``: learning rate, weight decay and EMA momentum as functions of the step;
- ``distributed``: the torchrun environment and the few collectives used;
- ``checkpoint``: atomic, exactly resumable checkpoints and the inference export;
- ``trainer``: the loop that ties them together;
- ``synthetic``, ``evaluate``: a generated labelled corpus, held-out accuracy and a linear probe
  (the learning tests and ``benchmarks/bench_train.py``).
"""
