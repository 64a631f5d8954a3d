"""One module per training recipe: `identity` (`selfcog run`'s fine-tune) and `sft` (`selfcog train CONFIG`)."""
