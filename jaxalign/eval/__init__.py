"""Evaluation of jaxalign models: `python -m jaxalign.eval` (`config`, `policy`, `tasks`, `report`), the
statistics it reports (`metrics`), and an lm-evaluation-harness model (`lm_eval_adapter`, which needs the optional
`eval` extra; import it explicitly)."""
