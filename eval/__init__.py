"""Evaluation and evidence: metrics by position, needle-in-a-haystack, lm-eval, reports, ablations.

- ``eval.sources``: any model source (run folder, Composer checkpoint, HF / mamba_ssm folder)
  -> a ``MambaLMHeadModel`` with its tokenizer and run config.
- ``eval.metrics``: cross-entropy, perplexity and top-k accuracy, overall and by position in
  the document (``python -m recipes.evaluate`` prints and saves them).
- ``eval.needle``: needle-in-a-haystack (the paper's section 5.1) for our models and any HF
  causal LM.
- ``eval.harness``: lm-eval on an HF export, offline, with a local task in ``eval/tasks/``.
- ``eval.report``: the paper's figures for a set of runs, a Markdown summary and the findings page.
- ``eval.ablation``: a multi-seed ablation's table and the paper's comparisons, paired by seed.
- ``eval.stats``: Student t intervals of paired differences, and the verdict against a reference size.
"""
