"""cold-ray: serve LoRA adapters on one base model with Contrastive LoRA Decoding (CoLD).

The package's surface: `cold_ray.engine` (EngineCore, AsyncEngine), `cold_ray.serve:build_app`
(the Ray Serve application the deployment YAMLs name) and the `cold-ray` command line.
"""
