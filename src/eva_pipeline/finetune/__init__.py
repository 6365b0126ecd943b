"""Image fine-tuning (EVA paper Sec. 3.1, EVA-01 ``run_class_finetuning.py``), Kedro-free: optimiser groups with
layer decay, augmentation, CutMix and label smoothing, EMA, and the starting weights of each stage."""
