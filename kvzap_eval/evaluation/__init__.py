"""Evaluation: the lm-eval model `kvzap_hf` and its startup hook, the paper protocol, sweeps over methods and
thresholds into a resumable table, reports, and the statistics they record.

Kept empty of imports: `kvzap_eval_lmeval.pth` imports `evaluation.lm_eval_hook` at every interpreter start.
"""
