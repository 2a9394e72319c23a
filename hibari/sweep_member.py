"""Config file for one sweep member run as a separate process:

    hibari pretrain --config hibari/sweep_member.py:WORKDIR/MEMBER/member_config.json --workdir ...

`hibari sweep --parallel N` writes the member's resolved pretraining config as JSON and starts
such a process; the argument is the JSON file.
"""
import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
