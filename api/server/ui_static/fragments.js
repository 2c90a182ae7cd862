// Server-rendered sections (the overview on /ui, a VM page's charts): each is a <section> with
// data-fragment (the URL of a fresh copy) and data-refresh-ms. A copy is fetched when the watch
// reports a change (the "vms-changed" event http.js sends; debounced) and every refresh-ms (the
// usage figures change without a watch event), then swapped in whole.
//
// The copy is HTML the server rendered and escaped (api/overview.py, api/vm_charts.py). It is
// parsed with DOMParser, which runs nothing (and the CSP forbids inline script anyway), and
// only the section of the same id is taken from it.

const CHANGE_DEBOUNCE_MS = 1000;

async function refresh(id) {
  const section = document.getElementById(id);
  if (!section || !section.dataset.fragment) return;
  try {
    const response = await fetch(section.dataset.fragment, { headers: { Accept: "text/html" } });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = doc.getElementById(id);
    if (fresh) section.replaceWith(document.importNode(fresh, true));
  } catch (err) {
    section.dataset.error = err.message;
  }
}

export function startFragments() {
  for (const section of document.querySelectorAll("section[data-fragment]")) {
    const id = section.id;
    const every = Number(section.dataset.refreshMs) || 10000;
    let timer = null;
    const soon = () => {
      clearTimeout(timer);
      timer = setTimeout(() => refresh(id), CHANGE_DEBOUNCE_MS);
    };
    document.addEventListener("vms-changed", soon);
    const poll = async () => {
      if (!document.hidden) await refresh(id);
      setTimeout(poll, every);
    };
    setTimeout(poll, every);
  }
}
