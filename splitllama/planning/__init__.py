"""Planning tools above training: the profiler (builds a training `Runtime`) and the planning CLIs."""
