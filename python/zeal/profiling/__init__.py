"""DeepSpeed's deepspeed.profiling for Zeal: the FLOPs profiler (zeal.profiling.flops_profiler)."""
