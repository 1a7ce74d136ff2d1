"""Training: models that learn from the labelled splits, and their outputs.

    data.training_rows(spark, cfg, "train")   Spark edge: example sketches -> prompts + bias base (pandas)
    sft.train(train_rows, valid_rows, ...)    answer-only fine-tuning (LoRA or full; ce / mse / both; rating / residual)
    export.export_model(run_dir)              the adapter merged into a plain HF folder with a model card
    stages.train_sft / stages.export          the `siren-batch train-sft` / `export` stages
    calibrate, probe                          calibration of the scorer's log-probs; the frozen-state probe

Modules under sft (batching, objective, model, checkpoint, loop) import no Spark;
nothing here imports torch at module level. Fine-tuning outputs live under
<train.out_dir>/<dataset>/<train.name>/.
"""
