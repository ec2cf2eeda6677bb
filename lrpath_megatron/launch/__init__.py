"""SLURM sbatch rendering and submission for a version plan, and a local torchrun runner."""
