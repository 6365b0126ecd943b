"""eva_pipeline: the EVA recipe (masked CLIP-feature reconstruction with a vanilla ViT) as a Kedro project.

The library parts (``models``, ``masking``, ``teachers``, ``training``, ``data``, ``evaluation``) import no Kedro and
can be used alone; ``pipelines`` wires them into Kedro.
"""

from eva_pipeline.runtime.quiet import silence_third_party_warnings

__version__ = "0.1.0"

silence_third_party_warnings()
