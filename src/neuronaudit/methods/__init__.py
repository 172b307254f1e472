"""The audit's algorithms, on tensors and tables, with no file I/O: the contrastive screen, CNA
circuit scaling, keystone neurons, the control-window law, gradient-vs-forward attribution and
the refusal-tuning recipe."""
