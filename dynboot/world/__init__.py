"""The embedded world: a procedural tabletop where every prediction has an exact score."""

from dynboot.world.actions import Action, ActionError, apply_action, infer_action, parse_action, valid_actions
from dynboot.world.render import GridTokenizer, parse, render
from dynboot.world.scene import WorldSpec, random_scene

__all__ = ["Action", "ActionError", "GridTokenizer", "WorldSpec", "apply_action", "infer_action", "parse",
           "parse_action", "random_scene", "render", "valid_actions"]
