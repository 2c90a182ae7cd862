// Actions: VM power buttons and force-unlock, as POSTs whose result is shown in <output>.

import { NONE, enc, showResult } from "./dom.js";
import { post } from "./http.js";
import { copyText, vmPath } from "./vm_page.js";

async function vmAction(button) {
  const { action, project, name } = button.dataset;
  button.disabled = true;
  showResult(`${action} ${name}: sending\u2026`, true);
  try {
    const vm = await post(`${vmPath(project, name)}/${action}`, {});
    showResult(
      `${action} ${name}: requested (phase ${vm.status.phase}, restarts ${vm.status.restarts}).`,
      true,
    );
  } catch (err) {
    showResult(`${action} ${name} failed: ${err.message}`, false);
  } finally {
    button.disabled = false;
  }
}

async function forceUnlock(button) {
  const { project, lockId, lockWho } = button.dataset;
  const question =
    `Force-unlock project "${project}"?\n\nLock ID: ${lockId}\nHeld by: ${lockWho}\n\n` +
    "Only do this when that run is dead: two runs writing one state lose changes.";
  if (!window.confirm(question)) return;
  button.disabled = true;
  try {
    // The ID makes the server refuse if a newer lock has replaced the one shown.
    await post(`/projects/${enc(project)}/force-unlock`, { id: lockId });
    showResult(`Project ${project}: lock ${lockId} released.`, true);
    const cell = button.closest('td[data-col="lock"]');
    if (cell) cell.textContent = NONE;
    else button.replaceWith(document.createTextNode("Released."));
  } catch (err) {
    button.disabled = false;
    showResult(`Force-unlock of ${project} failed: ${err.message}`, false);
  }
}

document.addEventListener("click", (event) => {
  const copy = event.target.closest("button[data-copy]");
  if (copy) copyText(copy);
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  if (button.dataset.action === "force-unlock") forceUnlock(button);
  else vmAction(button);
});
