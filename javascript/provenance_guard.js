// provenance-guard (A1111/Forge): after each generation, fill the panel under the gallery with the matches.
// The HTML comes from the extension, every caption and url escaped there; it is only inserted, never built here.
(function () {
  function refresh(tab) {
    const panel = gradioApp().querySelector(`#provenance_guard_panel_${tab}`);
    if (!panel) return;
    fetch(`./provenance-guard/panel?tab=${tab}`)
      .then((r) => (r.ok ? r.json() : { html: "" }))
      .then((data) => { panel.innerHTML = data.html || ""; })
      .catch(() => {});
  }
  onUiLoaded(function () {
    ["txt2img", "img2img"].forEach(function (tab) {
      const info = gradioApp().querySelector(`#html_info_${tab}`);
      if (!info) return;
      new MutationObserver(() => refresh(tab)).observe(info, { childList: true, subtree: true });
    });
  });
})();
