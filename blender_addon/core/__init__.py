"""The add-on's bpy-free core: camera maths, curves, compositing, jobs, service glue.

Plain pytest covers it; only the modules beside ``core`` import ``bpy``.
"""
