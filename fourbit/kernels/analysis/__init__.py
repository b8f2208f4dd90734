"""Tools that read the compiled kernels, never imported by the library (tests/test_layers.py):

    report     compile every kernel for real GPUs without one; registers, spills, SASS counts
    sass       parse a cuobjdump -sass listing: instructions, the steady-state loop, its mix
    costmodel  static time bounds of the matmul plans the dispatcher would run, from their SASS
    hazards    what the interpreter cannot see: asynchronous wgmma register and proxy hazards,
               shared-memory tables read before a barrier
"""
