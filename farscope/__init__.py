"""farscope: look inside, and intervene on, language models served on a remote GPU box."""
