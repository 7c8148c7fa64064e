"""One grid cell as a Ray Tune trial: fine-tune with Ray Train + DeepSpeed, evaluate, log.

Read it in this order:
  driver.py    the Tune trial (`run_trial`): a Ray Train run per cell, named by the
               trial id, so that a retry with the same storage resumes it
  loop.py      what each Train worker runs: `train_cell` (fine-tune, select the
               epoch, decode dev) or `zero_shot_cell`; they and the vote baseline
               end through `finish`
  decoding.py  generation in batches of similar length, shared over the workers
  weights.py   the best epoch's weights, the training state a retry resumes from
  hardware.py  what the worker decides from what Ray gave it: device, precision,
               DeepSpeed's config and engine, sums over the workers
The MLflow writes of a trial are grid.tracking.MlflowLog; the order of the train
rows in each epoch is grid/order.py's.
"""
