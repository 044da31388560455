"""The ``SPLATFACE`` render engine: F12, animation renders and the Rendered viewport.

Final renders run on Blender's render thread, so they call the service synchronously:
per frame, every visible avatar's evaluated shape-key values and head matrix with the
scene camera, one ``render`` request per avatar, composited by depth, written into the
``Combined`` (RGBA), ``Depth`` and ``Normal`` passes. The viewport asks on the worker
thread (latest request wins) and draws the last frame that came back: a stale frame is
better than a stalled UI.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import bpy
import numpy as np
from mathutils import Color

from . import avatar, prefs, runtime
from ._protocol import Client, ProtocolError
from .core import camera as cam
from .core.memory import FrameMemory
from .core.passes import Layer, PassBuffers, composite

PASSES = ("rgb", "alpha", "depth", "normal")
#: Blender pass → service pass; Depth is always asked for (it composites avatars).
SERVICE_PASS = {"Combined": "rgb", "Depth": "depth", "Normal": "normal"}


@dataclass
class FrameTiming:
    """Where one frame's time went (seconds). ``blender``: camera, evaluated shape keys
    and head matrices; ``request``: the wait for the service's reply (Blender allocates
    the result and the engine touches its pages meanwhile); ``write`` includes
    ``convert`` (service passes → Blender buffers) and ``store`` (``foreach_set`` into
    the result's passes); the rest of it is ``end_result``. ``memory_kept``: the frame
    reused the memory a previous frame of the same render freed (see ``FrameMemory``)."""

    blender: float = 0.0
    request: float = 0.0
    write: float = 0.0
    convert: float = 0.0
    store: float = 0.0
    requests: int = 0
    memory_kept: bool = False


@dataclass
class LastRender:
    """The passes (Blender layout) and timing of the last final render in this process,
    for scripts, benchmarks and tests that cannot read ``Render Result`` pixels.

    ``passes`` are the engine's reused buffers: the next final render overwrites them."""

    passes: dict[str, np.ndarray] = field(default_factory=dict)
    width: int = 0
    height: int = 0
    timing: FrameTiming = field(default_factory=FrameTiming)


last_render = LastRender()
_pool: ThreadPoolExecutor | None = None


def _request_pool() -> ThreadPoolExecutor:
    """One thread that carries final renders' requests (made on first use)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="splatface-render")
    return _pool


#: Final renders convert into these (a frame's passes reuse the last frame's memory).
_pass_buffers = PassBuffers()


#: The views Stereo 3D renders (Blender's names for them).
STEREO = ("left", "right")


def render_views(render: bpy.types.RenderSettings) -> list[str]:
    """The views a final render makes: ``[""]`` (the one view) unless the scene renders
    several (Stereo 3D's left and right, or the enabled views of a multi-view setup)."""
    if not render.use_multiview:
        return [""]
    stereo = render.views_format == "STEREO_3D"
    names = [v.name for v in render.views if v.use and (not stereo or v.name in STEREO)]
    return names or [""]


def rec709_to_scene_linear() -> np.ndarray | None:
    """The 3x3 matrix from linear Rec.709 (the service's colours) to Blender's
    scene-linear working space (5.0's per-file one, or an OCIO config's scene_linear
    role, e.g. ACEScg), or None where they are the same (the usual case, no work).
    Blender's passes and world colours are in the working space; mathutils' conversion
    is linear, so the unit vectors give its matrix."""
    rows = [Color(v).from_rec709_linear_to_scene_linear() for v in np.eye(3)]
    matrix = np.array(rows, np.float32).T
    # 4.5's identity comes back through OCIO a few 1e-6 off
    return None if np.abs(matrix - np.eye(3)).max() < 1e-5 else matrix


def world_background(world: bpy.types.World | None) -> tuple[np.ndarray, bool]:
    """The scene-linear colour Blender's engines fill the frame with when Film >
    Transparent is off, and whether it is exact: a world whose output takes a Background
    node with a plain colour and strength (a new world's), the world's colour without
    nodes, black without a world or a surface. A textured world (an HDRI, a sky) is not
    one colour: its viewport colour stands in (False)."""
    if world is None:
        return np.zeros(3, np.float32), True
    colour = np.array(world.color[:3], np.float32)
    tree = world.node_tree
    # 5.0 always uses the world's nodes (and deprecates asking)
    if tree is None or (bpy.app.version < (5, 0) and not world.use_nodes):
        return colour, True
    outputs = [n for n in tree.nodes if n.bl_idname == "ShaderNodeOutputWorld"]
    output = next((n for n in outputs if n.is_active_output), outputs[0] if outputs else None)
    if output is None or not output.inputs["Surface"].is_linked:
        return np.zeros(3, np.float32), True
    node = output.inputs["Surface"].links[0].from_node
    if node.bl_idname == "ShaderNodeBackground":
        tint, strength = node.inputs["Color"], node.inputs["Strength"]
        if not (tint.is_linked or strength.is_linked):
            return np.array(tint.default_value[:3], np.float32) * strength.default_value, True
    return colour, False


def scene_camera(
    depsgraph: bpy.types.Depsgraph,
    override: bpy.types.Object | None = None,
    engine: bpy.types.RenderEngine | None = None,
    size: tuple[int, int] | None = None,
) -> cam.ProtocolCamera:
    """The protocol camera of the scene's active camera at the evaluated frame; with a
    render region (Ctrl+B), the camera of that region alone, which is what Blender's
    result holds (composited into the frame by Blender unless cropped to it). ``override``:
    the camera Blender names instead (a sequencer Scene strip's). ``engine``: where the
    scene renders several views, the engine whose active view is meant (its eye's place
    and shift, as Blender derives them from the camera's stereo settings). ``size``: the
    full frame Blender allocated (the engine's ``resolution_x``/``_y``), which stays as
    the render began when a handler changes the resolution between frames."""
    scene = depsgraph.scene
    camera = override or scene.camera
    if camera is None:
        raise ValueError("the scene has no active camera")
    ob = camera.evaluated_get(depsgraph)
    data = ob.data
    if ob.type != "CAMERA":  # an empty or a mesh can be made the scene's camera
        raise ValueError(f"the scene's camera {ob.name!r} is not a camera object ({ob.type})")
    if data.type != "PERSP":
        raise ValueError(f"camera {ob.name!r} is {data.type}; splatface renders perspective only")
    r = scene.render
    matrix, shift_x = ob.matrix_world, data.shift_x
    if engine is not None and r.use_multiview:
        matrix = engine.camera_model_matrix(ob, use_spherical_stereo=False)
        shift_x = engine.camera_shift_x(ob, use_spherical_stereo=False)
    full = cam.convert(
        cam.BlenderCamera(
            matrix_world=np.array(matrix, np.float64),
            lens=data.lens,
            sensor_width=data.sensor_width,
            sensor_height=data.sensor_height,
            sensor_fit=data.sensor_fit,
            shift_x=shift_x,
            shift_y=data.shift_y,
            resolution_x=r.resolution_x if size is None else size[0],
            resolution_y=r.resolution_y if size is None else size[1],
            resolution_percentage=r.resolution_percentage if size is None else 100,
            pixel_aspect_x=r.pixel_aspect_x,
            pixel_aspect_y=r.pixel_aspect_y,
            clip_start=data.clip_start,
            clip_end=data.clip_end,
        )
    )
    if not r.use_border:
        return full
    region = cam.render_region(
        full.width, full.height, r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y
    )
    return cam.crop(full, *region)


def render_layers(
    client: Client,
    frames: list[avatar.AvatarFrame],
    camera: cam.ProtocolCamera,
    timeout: float,
    passes: tuple[str, ...] = PASSES,
    on_sent: Callable[[], None] | None = None,
    kept: dict[bytes, Layer] | None = None,
) -> Layer:
    """Render every avatar with ``camera`` and composite them (an empty frame without).
    Rows come bottom-up, as Blender's passes and textures hold them. ``on_sent`` is
    called once the first request is on its way (also when there is none). ``kept``: an
    earlier call's layers by what they show; an avatar whose values, transform, camera
    and passes are unchanged reuses its layer instead of asking again, and ``kept`` is
    left holding this call's layers."""
    h, w = camera.height, camera.width
    if not frames:
        if on_sent is not None:
            on_sent()
        return Layer(
            np.zeros((h, w, 3), np.float32),
            np.zeros((h, w), np.float32),
            np.full((h, w), np.inf, np.float32),
            np.zeros((h, w, 3), np.float32),
            bottom_up=True,
        )
    view = b"".join(
        np.ascontiguousarray(x, np.float64).tobytes()
        for x in (camera.intrinsics, camera.world_to_camera, [w, h, camera.near or 0.0,
                                                              camera.far or 0.0])
    ) + ",".join(passes).encode()  # fmt: skip
    layers, shown, sent = [], {}, False
    for f in frames:
        key = view + f.avatar_id.encode() + f.curves.tobytes() + f.head.tobytes()
        layer = kept.get(key) if kept is not None else None
        if layer is None:
            try:
                reply = client.render(
                    f.avatar_id,
                    camera.intrinsics,
                    camera.world_to_camera,
                    w,
                    h,
                    curves=f.curves[None],
                    head=f.head,
                    passes=passes,
                    timeout=timeout,
                    rows="bottom_up",
                    on_sent=None if sent else on_sent,
                    near=camera.near,
                    far=camera.far,
                )
            except ProtocolError as exc:  # which of the scene's avatars it was about
                raise ProtocolError(
                    exc.code, f"{f.name}: {exc.message}", exc.details, exc.remote_traceback
                ) from exc
            sent = True
            layer = Layer.from_render(reply, bottom_up=True)
        shown[key] = layer
        layers.append(layer.held_out() if f.holdout else layer)
    if not sent and on_sent is not None:
        on_sent()
    if kept is not None:
        kept.clear()
        kept.update(shown)
    return composite(layers)


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, np.float32)


def _prefault(result: bpy.types.RenderResult, reply: Future) -> None:
    """Write every pass of a new ``result`` once while ``reply`` is still on its way.

    Blender allocates a result's passes untouched, so the first write into them pays the
    page faults (about 1.8 of the 2.5 ms that storing four 512x512 passes takes on a
    2-core machine); paying them during the wait takes them off the frame's time. Stops
    as soon as the reply is in."""
    pixels = result.resolution_x * result.resolution_y
    for rpass in result.layers[0].passes:
        if reply.done():
            return
        rpass.rect.foreach_set(_zeros(pixels * rpass.channels))


#: Floats per pixel of a result with every pass (Combined 4, Depth, Normal 3).
RESULT_FLOATS = 8
frame_memory = FrameMemory()


@bpy.app.handlers.persistent
def render_ended(*_args: Any) -> None:
    """``render_complete``/``render_cancel``: glibc's allocator back to its defaults."""
    frame_memory.release()


class SPLATFACE_RenderEngine(bpy.types.RenderEngine):
    """Gaussian-splat avatars rendered by the splatface service."""

    bl_idname = "SPLATFACE"
    bl_label = "splatface"
    bl_use_preview = False
    bl_use_shading_nodes_custom = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._view = ViewportState()

    def __del__(self) -> None:
        try:
            self._view.engine = None
        except (AttributeError, ReferenceError):  # Blender freed the engine first
            pass

    def update_render_passes(
        self, scene: bpy.types.Scene | None = None, renderlayer: bpy.types.ViewLayer | None = None
    ) -> None:
        self.register_pass(scene, renderlayer, "Combined", 4, "RGBA", "COLOR")
        if renderlayer.use_pass_z:
            self.register_pass(scene, renderlayer, "Depth", 1, "Z", "VALUE")
        if renderlayer.use_pass_normal:
            self.register_pass(scene, renderlayer, "Normal", 3, "XYZ", "VECTOR")

    def render(self, depsgraph: bpy.types.Depsgraph) -> None:
        """One frame of one view layer: every view of it (both eyes in Stereo 3D), over
        the world's colour where the film is not transparent. Whatever goes wrong fails
        the frame: an exception out of here would have Blender save it blank."""
        try:
            self._render(depsgraph)
        except Exception as exc:
            traceback.print_exc()
            self._fail(f"splatface: {type(exc).__name__}: {exc}")

    def _render(self, depsgraph: bpy.types.Depsgraph) -> None:
        background = None
        if not depsgraph.scene.render.film_transparent:
            # the evaluated world: an animation render leaves keyed colours off the original
            background, flat = world_background(depsgraph.scene_eval.world)
            if not flat:
                self.report(
                    {"WARNING"},
                    "splatface draws the world as one colour (its viewport colour here): "
                    "composite the avatars over an environment with Film > Transparent",
                )
        matrix = rec709_to_scene_linear()
        for i, view in enumerate(render_views(depsgraph.scene.render)):
            if view:
                self.active_view_set(view)
            if not self._render_view(depsgraph, view, background, matrix, warn=i == 0):
                return

    def _render_view(
        self,
        depsgraph: bpy.types.Depsgraph,
        view: str,
        background: np.ndarray | None,
        matrix: np.ndarray | None = None,
        warn: bool = True,
    ) -> bool:
        """Render ``view`` ("" where the scene has one) into its result, its colours taken
        into the working space by ``matrix`` (see :func:`rec709_to_scene_linear`), over
        the scene-linear colour ``background`` if one is given; False (and the render
        failed, with why) where it could not."""
        timing = FrameTiming()
        t0 = time.perf_counter()
        try:
            camera = scene_camera(
                depsgraph,
                self.camera_override,
                self if view else None,
                (self.resolution_x, self.resolution_y),
            )
            settings = prefs.connection_settings().resolved()
            client = runtime.client()
            frames = avatar.gather(depsgraph, True, client, settings.timeout)
        except (ValueError, OSError) as exc:
            self._fail(str(exc))
            return False
        if warn:
            for warning in dict.fromkeys(f.warning for f in frames if f.warning):
                self.report({"WARNING"}, warning)
        wanted = ("rgb", "alpha", "depth") + (
            ("normal",) if depsgraph.view_layer.use_pass_normal else ()
        )
        # the service renders while Blender allocates the result and the engine touches
        # its pages (the socket wait releases the GIL); Blender's calls hold it, so they
        # wait until the request is sent rather than delay it
        sent = threading.Event()

        def request() -> Layer:
            try:
                runtime.start_if_down()
                layer = render_layers(client, frames, camera, settings.timeout, wanted, sent.set)
                if matrix is not None:  # before the world's colour, already scene-linear
                    layer = layer.converted(matrix)
                return layer if background is None else layer.over(background)
            finally:
                sent.set()  # also when it failed before sending

        reply = _request_pool().submit(request)
        t1 = time.perf_counter()
        timing.memory_kept = frame_memory.keep(camera.width * camera.height * 4 * RESULT_FLOATS)
        sent.wait()
        # this view layer's result only: with several layers, each render is one of them
        result = self.begin_result(
            0, 0, camera.width, camera.height, layer=depsgraph.view_layer.name, view=view
        )
        if (result.resolution_x, result.resolution_y) != (camera.width, camera.height):
            self.end_result(result, cancel=True)
            reply.cancel()
            self._fail(
                f"splatface: Blender's result is {result.resolution_x}x{result.resolution_y}, "
                f"the frame asked of the service {camera.width}x{camera.height}"
            )
            return False
        names = tuple(p.name for p in result.layers[0].passes if p.name in SERVICE_PASS)
        if not timing.memory_kept:
            _prefault(result, reply)
        try:
            layer = reply.result()
        except Exception as exc:  # any failure fails the frame: never a blank one saved
            self.end_result(result, cancel=True)
            why = f"{exc.message} [{exc.code}]" if isinstance(exc, ProtocolError) else repr(exc)
            self._fail(f"splatface service ({settings.endpoint}): {why}")
            return False
        t3 = time.perf_counter()
        c2w = np.linalg.inv(camera.world_to_camera)[:3, :3]
        buffers = _pass_buffers.convert(layer, c2w, names)
        timing.convert = time.perf_counter() - t3
        for rpass in result.layers[0].passes:
            data = buffers.get(rpass.name)
            if data is not None:
                rpass.rect.foreach_set(data)
        timing.store = time.perf_counter() - t3 - timing.convert
        self.end_result(result)
        t4 = time.perf_counter()
        # the request's time is the wait; Blender's work during it is hidden in it
        timing.blender, timing.request, timing.write = t1 - t0, t3 - t1, t4 - t3
        timing.requests = len(frames)
        last_render.passes, last_render.timing = buffers, timing
        last_render.width, last_render.height = camera.width, camera.height
        return True

    def _fail(self, message: str) -> None:
        self.report({"ERROR"}, message)
        if hasattr(self, "error_set"):
            self.error_set(message)

    # -- viewport -----------------------------------------------------------------

    def view_update(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        self._view.engine = self

    def view_draw(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        self._view.engine = self
        self._view.request(context, depsgraph)
        self._view.draw(self, context, depsgraph.scene)
        # why the view shows nothing, or an older frame (the viewport's status text); only
        # an interactive Blender draws, where no test reaches: a failure must not stop it
        try:
            self.update_stats("", f"splatface: {self._view.error}" if self._view.error else "")
        except (AttributeError, RuntimeError, ReferenceError):
            pass


class ViewportState:
    """The Rendered viewport's last request and image (only used in an interactive Blender).

    ``request`` sends a new render when the frame's values or the view changed, keyed so
    only the latest waits; the reply is stored from the main thread and a redraw asked.
    """

    def __init__(self) -> None:
        self.engine: SPLATFACE_RenderEngine | None = None
        self.signature: bytes = b""
        self.image: np.ndarray | None = None  # [h, w, 4] float32, rows bottom-up
        self.texture: Any = None
        self.error: str = ""
        #: the last image's layers, per avatar (see :func:`render_layers`): editing one of
        #: a dozen avatars re-renders that one; only the worker thread touches them
        self.layers: dict[bytes, Layer] = {}
        self.layers_epoch = runtime.store_epoch  # see :data:`runtime.store_epoch`

    def request(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        """Ask for the 3D View's current frame at the preferences' viewport scale."""
        region, rv3d = context.region, context.region_data
        p = prefs.preferences()
        scale = p.viewport_scale if p is not None else 0.5
        w, h = max(1, int(region.width * scale)), max(1, int(region.height * scale))
        self.request_view(rv3d.view_matrix, rv3d.window_matrix, w, h, depsgraph)

    def request_view(
        self,
        view_matrix: Any,
        window_matrix: Any,
        width: int,
        height: int,
        depsgraph: bpy.types.Depsgraph,
    ) -> Future | None:
        """Ask for the frame seen through a view (``view_matrix``/``window_matrix`` as the
        3D View's ``region_data`` has them) at ``width`` x ``height``; returns the request's
        future, or ``None`` when nothing changed since the last request (or the view
        cannot be rendered: :attr:`error` says why). Needs no window, so it is tested
        headless; only :meth:`draw` needs the GPU."""
        try:
            camera = cam.from_projection(view_matrix, window_matrix, width, height)
        except ValueError as exc:  # an orthographic view: the last image would lie
            self.error, self.image, self.texture, self.signature = str(exc), None, None, b""
            return None
        w, h = camera.width, camera.height
        frames = avatar.gather(depsgraph, final_render=False)
        clip = [camera.near or 0.0, camera.far or 0.0]
        # behind the avatars, what a final render puts there: the world's colour unless
        # the film is transparent (then the viewport's own background shows through)
        scene = depsgraph.scene
        background = None
        if not scene.render.film_transparent:
            background = world_background(depsgraph.scene_eval.world)[0]
        matrix = rec709_to_scene_linear()  # the display shader expects scene-linear
        parts = [camera.intrinsics, camera.world_to_camera, np.array([w, h, *clip], np.float64),
                 np.zeros(0) if background is None else background,
                 np.zeros(0) if matrix is None else matrix]  # fmt: skip
        epoch = runtime.store_epoch
        parts.append(np.array([epoch]))
        for f in frames:
            parts += [np.frombuffer(f.avatar_id.encode(), np.uint8), f.curves, f.head]
        signature = b"".join(np.ascontiguousarray(x).tobytes() for x in parts)
        if signature == self.signature:
            return None
        try:
            client, timeout = runtime.client(), runtime.settings().timeout
        except (ValueError, OSError) as exc:
            self.error = str(exc)
            return None
        self.signature = signature

        def work() -> np.ndarray:
            runtime.start_if_down()
            if self.layers_epoch != epoch:  # avatars left the store: none kept is trusted
                self.layers.clear()
                self.layers_epoch = epoch
            layer = render_layers(client, frames, camera, timeout, ("rgb", "alpha", "depth"),
                                  kept=self.layers)  # fmt: skip
            if matrix is not None:
                layer = layer.converted(matrix)
            if background is not None:
                layer = layer.over(background)
            return np.concatenate([layer.rgb, layer.alpha[..., None]], axis=-1)  # bottom-up

        def done(future: Future) -> None:
            exc = future.exception()
            if exc is not None:
                # keep the last image; the next redraw (a user action) asks again
                self.error, self.signature = str(exc), b""
                return
            self.image, self.texture, self.error = future.result(), None, ""
            if self.engine is not None:
                try:
                    self.engine.tag_redraw()
                except ReferenceError:  # the viewport closed meanwhile
                    self.engine = None

        return runtime.submit(work, done, key="viewport")

    def draw(
        self, engine: SPLATFACE_RenderEngine, context: bpy.types.Context, scene: bpy.types.Scene
    ) -> None:
        import gpu
        from gpu_extras.presets import draw_texture_2d

        if self.image is None:
            return
        h, w = self.image.shape[:2]
        if self.texture is None:
            buf = gpu.types.Buffer("FLOAT", w * h * 4, self.image.ravel())
            self.texture = gpu.types.GPUTexture((w, h), format="RGBA16F", data=buf)
        gpu.state.blend_set("ALPHA_PREMULT")
        engine.bind_display_space_shader(scene)
        draw_texture_2d(self.texture, (0, 0), context.region.width, context.region.height)
        engine.unbind_display_space_shader()
        gpu.state.blend_set("NONE")
