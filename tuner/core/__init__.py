"""The core loop: sampler, session, agent, arbiter, actuator, the window the policies read, statistics."""
