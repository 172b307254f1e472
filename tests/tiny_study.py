"""The tiny study's settings shared by the workflow tests that run the whole DAG on a tiny random
model (tests/workflow/test_workflow.py, tests/workflow/test_slurm.py); each adds its model."""

TINY_STUDY = {
    "study": "tiny",
    "threads": 1,
    "prompts": {"limit": 3},
    "collect": {"batch_size": 4, "max_length": 64},
    "refusal": {"steps": 2, "batch_size": 2, "answer_max_new_tokens": 4, "eval_max_new_tokens": 4},
    "rollouts": {"horizons": [2, 4], "prompts_per_set": 2, "batch_size": 8},
    "screen": {"n_boot": 100, "k": 4, "universal_top_n": 4},
    "cna": {"factors": [0.0], "caa_layers": [0.5], "caa_alphas": [-1.0], "max_new_tokens": 4, "prompts": 2},
    "keystone": {"k_max": 2, "n_random": 1},
    "capability": {"max_texts": 2, "max_task_prompts": 2, "max_new_tokens": 8},
    "window": {"n_candidates": 1, "n_random": 1, "x_grid": [1.0, 4.0], "single_pass_grid": [1.0, 4.0],
               "horizons": [2, 4], "n_prompts": 2, "n_generic": 2, "n_heldout": 2, "row_batch_size": 8},
    "sufficient": {"n_explained": 1, "n_search": 8, "n_fresh": 8, "n_candidates": 2, "max_size": 2,
                   "n_random": 1, "n_control": 2, "max_new_tokens": 2, "n_boot": 100},
    "reasoning": {"n_discovery": 2, "n_validation": 1, "n_heldout": 2, "n_samples": 1, "temperature": 0.0,
                  "max_new_tokens": 4, "n_top": [2], "n_ablate": 2, "add_strengths": [1.0],
                  "blend_strengths": [0.5], "n_random": 1, "transfer_n_random": 1},
    # the tiny model's word-level vocabulary cannot spell the prompt sets: finish, marked
    "preconditions": {"on_fail": "mark", "n_prompts": 4},
}
