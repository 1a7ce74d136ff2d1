"""Training: answer-only fine-tuning at the rating-token position and its outputs.

    data.training_rows(spark, cfg, "train")   Spark edge: example sketches -> prompts + bias base (pandas)
    sft.train(train_rows, valid_rows, ...)    the torch loop (LoRA or full; ce / mse / both; rating / residual)
    export.export_model(run_dir)              adapter merged into a plain HF folder with a model card
    stages.train_sft / stages.export          the `siren-batch train-sft` / `export` stages

Modules below sft (batching, objective, model, checkpoint, loop) import no Spark;
nothing here imports torch at module level. Outputs live under
<train.out_dir>/<dataset>/<train.name>/.
"""
