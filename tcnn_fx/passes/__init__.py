"""Graph passes over ``torch.fx.GraphModule``: analyses write ``node.meta``, transforms return new modules."""
