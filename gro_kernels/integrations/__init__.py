"""Drop-ins for existing trainers. Each submodule imports its trainer library, so import the one you use:

    from gro_kernels.integrations.trl import GROGRPOTrainer, GRODPOTrainer, GROKTOTrainer, patch_trainer
    from gro_kernels.integrations.verl import register

Nothing here is imported by `import gro_kernels`: neither TRL nor verl is a dependency.
"""
