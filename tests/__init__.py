"""The test suite: one package per area (losses, model, optim, data, train, kernels, tooling);
shared helpers live in tests.support."""
