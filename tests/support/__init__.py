"""Helpers shared by the tests, imported as `from tests.support.<module> import ...`.

  processes         REPO_ROOT and run_python (a fresh Python process)
  process_group     run_on_group (a real gloo group of spawned ranks), open_clip's loss module
  loss_reference    fp64 contrastive-loss references and tolerance helpers
  memory_probe      script: peak extra memory of one loss forward+backward
  sync_audit        SyncAudit, the dispatch-mode audit of host synchronisations
  tiny_open_clip_train  a tiny open_clip_train setup and run (also a torchrun script)
  shard_samples     image and caption payloads for hand-made shards
  tiny_clip         tiny CLIP models, batches and gradient checks of the GradCache tests
"""
