"""oncoflow's domain library: data, models, training, evaluation, registry, bundles.

Plain Python + torch; knows nothing of Prefect, BentoML or Gradio.
"""
