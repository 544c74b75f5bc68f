"""One rank's tensors and how a step runs on them: the worker, the model runner, its input
batch, the device tail, CUDA graphs and start-up timings."""
