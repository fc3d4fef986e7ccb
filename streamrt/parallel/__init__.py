"""Multi-process generation over torch.distributed (gloo on CPU, NCCL on GPU): the
denoising-step pipeline (`steps`) and the layer pipeline (`layers`)."""
