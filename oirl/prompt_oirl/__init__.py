"""Prompt-OIRL (Sun et al., arXiv 2309.06553): learn offline, from logged (query, prompt, correct?) records, which
prompt to give each query, then choose it with a reward model and no LLM call.

    prompts.py   the candidate prompts and the seeded synthetic arithmetic set
    collect.py   run every (query, prompt) pair through the rollout actors (greedy) and log the records
    selector.py  the reward model over frozen MiniLM embeddings of (query, prompt), its training, the selector
    evaluate.py  held-out accuracy of selector vs best single prompt vs oracle, with Wilson 95% intervals
    cli.py       `oirl prompt-oirl collect|train|select|eval`
"""
