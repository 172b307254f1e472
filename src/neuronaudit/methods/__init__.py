"""The audit's algorithms, on tensors and tables, with no file I/O: the contrastive screen, CNA
circuit scaling, keystone neurons, the control-window law, gradient-vs-forward attribution,
sufficient neuron sets (WASD) with their input perturbations, and the refusal-tuning recipe."""
