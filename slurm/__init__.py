"""Slurm files shipped with heft (installed as package data of ``heft.slurm``): the sbatch template
``heft submit`` renders, and ``cluster.sh``, which brings up a single-host test cluster."""
