"""The trainer: end-to-end runs, command line, evaluation, accumulation, non-finite steps,
parallel wrappers, open_clip_train on clip_fast, GradCache."""
