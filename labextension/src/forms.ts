// The command palette's "aifab: serve a model…" and "aifab: stop service…": small forms whose
// checks are the server's own (POST /aifab/api/services validates as it does for %serve), so
// a mistake shows the very message the magic would print, and the form opens again with it.
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { createService, getSession, listServices, stopService } from './api';
import { h } from './dom';

interface IServeValues {
  model: string;
  name: string;
  maxModelLen: string;
}

class ServeForm extends Widget {
  constructor(values: IServeValues, error: string) {
    super();
    this.addClass('aifab-Form');
    const field = (label: string, name: string, value: string, hint: string) =>
      h(
        'label',
        {},
        h('span', {}, label),
        h('input', { name, value, placeholder: hint, class: 'jp-mod-styled' })
      );
    if (error) {
      this.node.appendChild(h('div', { class: 'aifab-Error' }, error));
    }
    this.node.appendChild(field('Model', 'model', values.model, 'a directory, a cached name or org/name'));
    this.node.appendChild(field('Name', 'name', values.name, 'lowercase letters, digits and -'));
    this.node.appendChild(field('Max model length', 'max_model_len', values.maxModelLen, 'tokens (optional)'));
  }

  getValue(): IServeValues {
    const get = (name: string) =>
      (this.node.querySelector(`input[name=${name}]`) as HTMLInputElement).value.trim();
    return { model: get('model'), name: get('name'), maxModelLen: get('max_model_len') };
  }
}

/** The default name %serve gives: the model's last path part, lowercased. */
export function defaultName(model: string): string {
  const base = model.replace(/\/+$/, '').split('/').pop() || '';
  const name = base.toLowerCase().replace(/[^a-z0-9-]+/g, '-').replace(/^-+|-+$/g, '');
  return name.slice(0, 40) || 'model';
}

export async function serveModel(): Promise<void> {
  let values: IServeValues = { model: '', name: '', maxModelLen: '' };
  let error = '';
  for (;;) {
    const result = await showDialog({
      title: 'aifab: serve a model',
      body: new ServeForm(values, error),
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Serve' })]
    });
    if (!result.button.accept || !result.value) {
      return;
    }
    values = result.value;
    try {
      const session = await getSession();
      const spec: { [key: string]: unknown } = {
        kind: 'vllm',
        model: values.model,
        name: values.name || defaultName(values.model),
        gpus: session.visible_gpus.length ? 1 : 0, // as %serve: one GPU where there is one
        tensor_parallel: 'auto'
      };
      if (values.maxModelLen) {
        // sent as typed: the server says what a number must look like
        spec.max_model_len = /^[0-9]+$/.test(values.maxModelLen)
          ? Number(values.maxModelLen)
          : values.maxModelLen;
      }
      await createService(spec);
      return; // the panel shows it starting
    } catch (err) {
      error = (err as Error).message;
    }
  }
}

export async function stopServiceForm(): Promise<void> {
  let services;
  try {
    services = (await listServices()).filter(s => ['starting', 'ready'].includes(s.status));
  } catch (err) {
    await showErrorMessage('aifab: stop service', (err as Error).message);
    return;
  }
  if (!services.length) {
    await showErrorMessage('aifab: stop service', 'No service or run is running.');
    return;
  }
  const select = h('select', { class: 'jp-mod-styled', name: 'service' }) as HTMLSelectElement;
  for (const s of services) {
    select.appendChild(h('option', { value: s.name }, `${s.name} (${s.kind}, ${s.status})`));
  }
  const body = new Widget({ node: h('div', { class: 'aifab-Form' }, h('label', {}, 'Stop ', select)) });
  const result = await showDialog({
    title: 'aifab: stop service',
    body,
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop' })]
  });
  if (!result.button.accept) {
    return;
  }
  try {
    await stopService(select.value);
  } catch (err) {
    await showErrorMessage('aifab: stop service', (err as Error).message);
  }
}
