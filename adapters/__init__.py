"""Task adapters (installed as ``multiexplain.adapters``): each turns a task's model and inputs
into activations at a layer and scalar scores, and hands them to the core."""
