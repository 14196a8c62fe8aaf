"""ReDrafter: a recurrent draft head over the target's hidden state, beam search and prefix-merged trees."""
