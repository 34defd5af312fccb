// The screening page: pick photos, tag eyes, grade them with /v1/grade/batch, show and print the results.
// Plain browser JavaScript, no build step. Everything stays in this tab: photos are shown from local blob:
// URLs, the optional API key lives in sessionStorage, and the only server contacted is this service.
"use strict";

(() => {
  const KEY_STORAGE = "retinagrade.apiKey";
  // Sent as the patient id when no reference is given, so the service still decides for the patient.
  const NO_REFERENCE = "(no reference)";

  // Plain-language meaning of each ICDR grade (the names come from the model card / the API).
  const GRADE_MEANINGS = [
    "No signs of diabetic damage to the retina were found.",
    "Very early changes only: tiny bulges in small blood vessels (microaneurysms).",
    "Damage to the retina's blood vessels beyond the earliest changes.",
    "Widespread bleeding or blocked vessels; a high risk of progressing to proliferative disease.",
    "Fragile new blood vessels are growing; a risk of bleeding inside the eye and of sight loss.",
  ];

  // Referral states: each has an icon and words, never colour alone. Which one applies is the service's
  // decision (``urgency`` of a result and of a patient, retinagrade.referral); the page only puts it in words.
  const ACTIONS = {
    rescreen: { key: "rescreen", icon: "✓", label: "Not referable", text: "Rescreen in 12 months." },
    refer: { key: "refer", icon: "!", label: "Referable", text: "Refer to an ophthalmologist." },
    urgent: {
      key: "urgent", icon: "‼", label: "Urgent referral",
      text: "Refer urgently to an ophthalmologist.",
    },
    undecided: {
      key: "undecided", icon: "?", label: "No decision yet",
      text: "The photos so far are not enough to decide.",
    },
    notGraded: { key: "not-graded", icon: "✕", label: "Not graded", text: "" },
  };

  // Quality and refusal reason codes (retinagrade.preprocessing.quality REASON_*) in words; a test checks
  // that every code has its sentence.
  const REASONS = {
    not_fundus: "This does not look like a photograph of the retina.",
    unlike_fundus_photos: "It looks like something other than a colour photograph of the retina (for example a scan, a skin photo or a face).",
    fundus_not_found: "No round field of view of a retina could be found in the picture.",
    image_too_small: "The picture has too few pixels to be graded.",
    grayscale: "The picture is black and white; a colour photograph is needed.",
    not_fundus_colour: "The colours are not those of a retina.",
    no_dark_surround: "There is no dark border around the picture, as fundus cameras produce.",
    field_of_view_too_small: "The retina fills too little of the picture.",
    too_dark: "The photo is too dark.",
    overexposed: "The photo is too bright (overexposed).",
    blurred: "The photo is blurred (out of focus, or the eye moved).",
    fundus_cut_off: "Part of the retina is cut off at the edge of the photo.",
    low_contrast: "The photo has too little contrast to show detail.",
    uneven_illumination: "The lighting is uneven across the retina.",
    low_quality: "The overall image quality is too low.",
  };

  // API error codes (retinagrade.errors, retinagrade.api.errors) as sentences for people.
  const ERRORS = {
    empty_file: "The file is empty. Check the file, or export the photo again.",
    corrupt_image: "The file could not be read as an image; it may be damaged or incomplete. "
      + "Check the file, or export the photo again.",
    unsupported_format: "This file is not an image the service can read. Use a JPEG or PNG photo "
      + "from the fundus camera.",
    unsupported_media_type: "This file is not an image the service can read. Use a JPEG or PNG photo "
      + "from the fundus camera.",
    dicom_support_missing: "This is a DICOM file, and this service is not set up to read DICOM. Export the "
      + "photo from the camera or PACS as a JPEG or PNG, or ask your IT support to enable DICOM.",
    dicom_unsupported_transfer_syntax: "This DICOM file is compressed in a way the service cannot read (for "
      + "example video). Export the photo as a JPEG or as an uncompressed DICOM file and try again.",
    dicom_no_pixel_data: "This DICOM file holds no picture. Send the photo itself, not a report or a list.",
    dicom_not_photograph: "This DICOM file is not a photograph (for example a CT or MR image). Send a colour "
      + "fundus photo.",
    not_acceptable: "The service cannot answer in the format that was asked for.",
    multi_frame_not_supported: "This file holds several pictures. Export each photo as a file of its own and try again.",
    image_too_large: "The photo is too large for the service. Export a smaller JPEG from the camera "
      + "and try again.",
    request_too_large: "Too many photos or too much data at once. Grade fewer photos at a time, or "
      + "export smaller JPEGs.",
    invalid_input: "The file could not be used as a photo. Check the file.",
    bad_request: "The service could not read the request. Reload the page and try again.",
    malformed_request: "The service could not read the request. Reload the page and try again.",
    validation_error: "Part of the form is not valid.",
    unauthorized: "The grading service needs a valid API key. Enter it above.",
    overloaded: "The grading service is busy. Wait a few seconds and try again.",
    audit_unavailable: "The grading service cannot record results right now, so it does not grade. Try again "
      + "in a minute; if it keeps failing, tell your IT support.",
    request_timeout: "The photos took too long to arrive. Check the network connection and try again.",
    not_ready: "The grading service is still starting. Wait a few seconds and try again.",
    not_found: "The grading service does not offer this function. It may be an older version.",
    internal_error: "The grading service failed. Try again; if it keeps failing, tell your IT support.",
    unknown_site: "The grading service has no site profile of that name. Ask your IT support which sites it serves.",
    unknown_operating_point: "The grading service has no operating point of that name. The model card lists the ones it has.",
    unknown_evidence: "This model has no evidence map of that kind.",
    site_profile_invalid: "The grading service's site profile does not fit its model. Tell your IT support.",
    calibration_sample_too_small: "Too few graded photos to calibrate the site. See the site deployment guide.",
    network: "The grading service cannot be reached. Check that it is running and try again.",
  };
  const STATUS_CODES = { 400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "request_too_large",
    415: "unsupported_media_type", 422: "validation_error", 503: "overloaded" };

  const state = {
    queue: [], // {id, file, url, eye}
    nextId: 0,
    card: null, // the model card from /v1/model
    apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
    busy: false,
  };

  const $ = (id) => document.getElementById(id);

  /** Build an element; ``children`` are nodes or text (always inserted as text, never as HTML). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ---- the eye from the file name ----------------------------------------------------------------
  const EYE_WORDS = { left: "left", l: "left", os: "left", right: "right", r: "right", od: "right" };

  /** "left", "right" or "" when the name does not say (or says both). */
  function guessEye(filename) {
    const stem = filename.replace(/\.[^.]*$/, "");
    const words = stem.replace(/([a-z])([A-Z])/g, "$1 $2").toLowerCase().split(/[^a-z]+/);
    const eyes = new Set(words.map((w) => EYE_WORDS[w]).filter(Boolean));
    return eyes.size === 1 ? [...eyes][0] : "";
  }

  const eyeName = (eye) => (eye === "left" ? "Left eye" : eye === "right" ? "Right eye" : "Eye not set");
  const percent = (x) => `${Math.round(x * 100)}%`;

  // ---- talking to the service --------------------------------------------------------------------
  class ApiProblem extends Error {
    constructor(code, status, detail) {
      super(code);
      this.code = code;
      this.status = status;
      this.detail = detail;
    }
  }

  function errorSentence(code, detail) {
    const sentence = ERRORS[code] || "The request failed. Try again.";
    // Field errors are written for people by the service and say what to fix.
    return code === "validation_error" && detail ? `${sentence} ${detail}` : sentence;
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.apiKey) headers.set("X-API-Key", state.apiKey);
    let response;
    try {
      response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "same-origin" });
    } catch {
      throw new ApiProblem("network", 0, "");
    }
    if (!response.ok) {
      let body = {};
      try {
        body = await response.json();
      } catch {
        // Not JSON (a proxy's page, say): the status code is all there is.
      }
      throw new ApiProblem(body.code || STATUS_CODES[response.status] || "internal_error", response.status,
        body.message || "");
    }
    return response.json();
  }

  // ---- start-up: readiness, API key, model card --------------------------------------------------
  function showNotice(text) {
    const notice = $("service-notice");
    notice.textContent = text;
    notice.hidden = !text;
  }

  async function connect() {
    try {
      await api("/health/ready");
    } catch (problem) {
      $("model-line").textContent = "Grading service not ready.";
      showNotice(errorSentence(problem.code === "overloaded" ? "not_ready" : problem.code));
      setTimeout(connect, 2000);
      return;
    }
    try {
      state.card = await api("/v1/model");
    } catch (problem) {
      if (problem.code === "unauthorized") {
        askForKey(state.apiKey ? "That API key was not accepted. Check it and enter it again." : "");
        return;
      }
      showNotice(errorSentence(problem.code));
      return;
    }
    showNotice("");
    $("api-key-form").hidden = true;
    describeModel(state.card);
  }

  function askForKey(message) {
    const form = $("api-key-form");
    form.hidden = false;
    $("model-line").textContent = "An API key is needed.";
    showNotice(message);
    $("api-key").focus();
  }

  function describeModel(card) {
    const site = siteProfile(card);
    const siteText = site ? ` · site profile ${site.name} (fitted ${site.created})` : "";
    const line = `Model: ${card.name} · version ${card.version}${siteText}`;
    $("model-line").textContent = line;
    $("report-model").textContent = `${card.name}, version ${card.version}${site ? `, site profile ${site.name}` : ""}`;
    $("intended-use").textContent = card.intended_use ? `Intended use: ${card.intended_use}` : "";
    $("operating-point").textContent = operatingPoint(card);
    if (!card.metrics || Object.keys(card.metrics).length === 0) {
      showNotice("This model has no validation results recorded. Use it for testing only, not for patients.");
    }
  }

  // The profile of the site this page grades under (the service's default site), if any.
  function siteProfile(card) {
    return (card.site_profiles || []).find((profile) => profile.name === card.default_site) || null;
  }

  function operatingPoint(card) {
    const ref = card.referable || {};
    const min = ref.min_grade;
    const names = card.grade_names || [];
    let text = typeof min === "number"
      ? `Referable means grade ${min} (${names[min]}) or worse, or an estimated risk of it at or over the operating point`
      : "Referable";
    const site = siteProfile(card);
    if (site) {
      return `${text}; this site's operating point (profile ${site.name}, fitted on ${site.sample.n_graded} local `
        + `photos): risk at least ${percent(site.parameters.referable_threshold)}.`;
    }
    const section = card.operating_points || {};
    const name = card.operating_point || section.default;
    const point = (section.points || {})[name];
    if (point && typeof point.threshold === "number") {
      text += `; operating point ${name}: risk at least ${percent(point.threshold)}`;
      const served = point.served || [];
      if (served.length) text += ` (held-out sources it serves at its targets: ${served.join(", ")})`;
    } else if (typeof ref.threshold === "number") {
      text += `; risk at least ${percent(ref.threshold)}`;
    }
    return `${text}.`;
  }

  // ---- the queue of photos -----------------------------------------------------------------------
  function addFiles(fileList) {
    const added = [];
    for (const file of fileList) {
      const item = { id: state.nextId++, file, url: URL.createObjectURL(file), eye: guessEye(file.name) };
      state.queue.push(item);
      added.push(item);
    }
    if (!added.length) return;
    $("form-error").hidden = true;
    renderQueue();
    const list = added.map((i) => `${i.file.name} (${eyeName(i.eye).toLowerCase()})`).join(", ");
    announce(`${added.length} photo${added.length > 1 ? "s" : ""} added: ${list}.`);
  }

  function renderQueue() {
    const queue = $("queue");
    queue.replaceChildren(...state.queue.map(queueItem));
    $("queue-title").hidden = state.queue.length === 0;
  }

  function queueItem(item) {
    const selectId = `eye-${item.id}`;
    const select = el("select", { id: selectId, className: "eye-select" },
      el("option", { value: "" }, "Not set"),
      el("option", { value: "right" }, "Right eye (OD)"),
      el("option", { value: "left" }, "Left eye (OS)"));
    select.value = item.eye;
    select.addEventListener("change", () => {
      item.eye = select.value;
    });
    const remove = el("button", { type: "button", className: "button button-small",
      "aria-label": `Remove ${item.file.name}` }, "Remove");
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(item.url);
      state.queue = state.queue.filter((i) => i !== item);
      renderQueue();
      announce(`${item.file.name} removed.`);
      const next = document.querySelector("#queue .eye-select") || $("file-input");
      next.focus();
    });
    return el("li", { className: "queue-item" },
      el("img", { src: item.url, alt: "", className: "thumb" }),
      el("div", { className: "queue-name" },
        el("span", { className: "filename" }, item.file.name),
        el("span", { className: "filesize" }, `${(item.file.size / 1048576).toFixed(1)} MB`)),
      el("div", { className: "queue-eye" },
        el("label", { for: selectId }, "Eye ", el("span", { className: "visually-hidden" }, `for ${item.file.name}`)),
        select),
      remove);
  }

  function clearAll() {
    for (const item of state.queue) URL.revokeObjectURL(item.url);
    state.queue = [];
    renderQueue();
    $("patient-ref").value = "";
    $("results").hidden = true;
    $("result-list").replaceChildren();
    $("patient-summary").replaceChildren();
    $("form-error").hidden = true;
    announce("Cleared. Ready for the next patient.");
    $("file-input").focus();
  }

  // ---- grading -----------------------------------------------------------------------------------
  function announce(text) {
    // Clear first so that the same sentence twice is still read out.
    const status = $("status");
    status.textContent = "";
    window.setTimeout(() => {
      status.textContent = text;
    }, 50);
  }

  function showFormError(text) {
    const box = $("form-error");
    box.textContent = text;
    box.hidden = false;
  }

  async function gradeAll(event) {
    event.preventDefault();
    if (state.busy) return;
    if (!state.queue.length) {
      showFormError("Choose at least one photo first.");
      $("file-input").focus();
      return;
    }
    const items = [...state.queue];
    const reference = $("patient-ref").value.trim();
    const body = new FormData();
    for (const item of items) {
      body.append("files", item.file, item.file.name);
      body.append("eye", item.eye);
      body.append("patient_id", reference || NO_REFERENCE);
    }
    state.busy = true;
    const button = $("grade-button");
    button.setAttribute("aria-disabled", "true");
    $("form-error").hidden = true;
    announce(`Grading ${items.length} photo${items.length > 1 ? "s" : ""}…`);
    try {
      const answer = await api("/v1/grade/batch?explain=true", { method: "POST", body });
      showResults(answer, items, reference);
    } catch (problem) {
      if (problem.code === "unauthorized") askForKey(errorSentence("unauthorized"));
      const sentence = errorSentence(problem.code, problem.detail);
      showFormError(sentence);
      announce(`Not graded. ${sentence}`);
    } finally {
      state.busy = false;
      button.removeAttribute("aria-disabled");
    }
  }

  // The service's urgency (retinagrade.referral.Urgency) of a graded result or of a patient, in words.
  const URGENCY_ACTIONS = { routine: ACTIONS.rescreen, refer: ACTIONS.refer, urgent: ACTIONS.urgent };

  function actionFor(result) {
    return URGENCY_ACTIONS[result.urgency] || ACTIONS.notGraded;
  }

  function showResults(answer, items, reference) {
    const graded = [];
    const cards = answer.items.map((entry) => {
      const item = items[entry.index];
      if (entry.result && entry.result.status === "graded") graded.push({ entry, item });
      return resultCard(entry, item);
    });
    $("result-list").replaceChildren(...cards);
    const patient = answer.patients[0];
    const summary = patientSummary(patient, answer.items, items, reference);
    $("patient-summary").replaceChildren(summary.node);
    $("heatmap-legend").hidden = graded.length === 0;
    $("report-date").textContent = new Date().toLocaleString(undefined,
      { dateStyle: "long", timeStyle: "short" });
    $("report-patient").textContent = reference || "none given";
    const results = $("results");
    results.hidden = false;
    const title = $("results-title");
    title.setAttribute("tabindex", "-1");
    title.focus();
    const notGraded = answer.items.length - graded.length;
    announce(`Results for ${answer.items.length} photo${answer.items.length > 1 ? "s" : ""}: `
      + `${graded.length} graded, ${notGraded} not graded. ${summary.sentence}`);
  }

  // Why the service referred (or did not refer) this eye: its ``referral_reason``, in words. A grade 0-1
  // eye referred for its risk says so, so that nobody reads it as moderate disease.
  function referralWhy(result) {
    if (result.referral_reason === "risk") {
      return `Mild or no retinopathy seen; referred because the estimated risk of referable diabetic `
        + `retinopathy is ${percent(result.p_referable)}.`;
    }
    if (result.referral_reason === "dme") {
      return "Mild or no retinopathy seen; referred for signs of macular oedema.";
    }
    if (result.referral_reason === "grade") return "Referred for the grade found.";
    return "";
  }

  // Macular oedema, from a model with an oedema output (absent otherwise).
  function dmeSentence(result) {
    if (typeof result.dme !== "boolean") return document.createDocumentFragment();
    const text = result.dme
      ? `Macular oedema: signs found (estimated probability ${percent(result.p_dme)}).`
      : `Macular oedema: no signs found (estimated probability ${percent(result.p_dme)}).`;
    return el("p", { className: "dme" }, text);
  }

  function pointSentence(result) {
    if (!result.operating_point) return "";
    return `Operating point: ${result.operating_point} (refers at grade 2 or worse, or at an estimated risk of `
      + `${percent(result.referable_threshold)} or more).`;
  }

  function decisionBadge(action, extra) {
    return el("p", { className: `decision decision-${action.key}` },
      el("span", { className: "decision-icon", "aria-hidden": "true" }, action.icon),
      el("strong", { className: "decision-label" }, action.label),
      action.text || extra
        ? el("span", { className: "decision-text" }, [action.text, extra].filter(Boolean).join(" "))
        : null);
  }

  function reasonList(reasons) {
    if (!reasons.length) return document.createDocumentFragment();
    return el("ul", { className: "reasons" },
      reasons.map((code) => el("li", {}, REASONS[code] || `Image problem: ${code.replaceAll("_", " ")}.`)));
  }

  function photoFigure(item) {
    return el("figure", { className: "photo" },
      el("img", { src: item.url, alt: `Uploaded photo ${item.file.name}` }),
      el("figcaption", {}, "Photo as taken"));
  }

  function evidenceFigure(entry, explanation) {
    const sliderId = `opacity-${entry.index}`;
    const overlay = el("img", {
      src: `data:image/png;base64,${explanation.heatmap_png_base64}`,
      alt: "Heatmap of the model's evidence over the cropped retina",
      className: "heatmap",
    });
    const layers = el("div", { className: "evidence-layers" }, overlay);
    if (explanation.fundus_png_base64) {
      // A service that also returns the plain crop lets the heatmap fade over the retina itself.
      layers.prepend(el("img", { src: `data:image/png;base64,${explanation.fundus_png_base64}`, alt: "",
        className: "fundus" }));
    }
    const output = el("output", { for: sliderId, className: "opacity-value" }, "100%");
    const slider = el("input", { type: "range", id: sliderId, min: "0", max: "100", step: "5", value: "100",
      className: "opacity-slider", "aria-valuetext": "100%" });
    slider.addEventListener("input", () => {
      const text = `${slider.value}%`;
      overlay.style.opacity = String(Number(slider.value) / 100);
      output.textContent = text;
      slider.setAttribute("aria-valuetext", text);
    });
    return el("figure", { className: "evidence" }, layers,
      el("figcaption", {}, "Model evidence (heatmap) over the cropped retina"),
      el("div", { className: "opacity-control no-print" },
        el("label", { for: sliderId }, "Heatmap opacity"), slider, output));
  }

  function resultCard(entry, item) {
    const title = el("h3", {}, `${eyeName(entry.eye || "")}`, el("span", { className: "card-file" }, ` — ${item.file.name}`));
    const card = el("article", { className: "result", "aria-label": `${eyeName(entry.eye || "")}, ${item.file.name}` }, title);
    const media = el("div", { className: "media" }, photoFigure(item));
    const body = el("div", { className: "result-body" });
    card.append(el("div", { className: "result-grid" }, media, body));

    if (entry.error) {
      card.classList.add("result-not-graded");
      body.append(decisionBadge(ACTIONS.notGraded, "The file could not be read."),
        el("p", { className: "todo" }, errorSentence(entry.error.code, entry.error.message)));
      return card;
    }
    const result = entry.result;
    if (result.status === "not_fundus") {
      card.classList.add("result-not-graded");
      body.append(decisionBadge(ACTIONS.notGraded, "This is not a retinal photograph."),
        reasonList(result.quality.reasons.filter((r) => r !== "not_fundus")),
        el("p", { className: "todo" }, "Check the file: choose a colour photograph of the retina from the "
          + "fundus camera for this eye."));
      return card;
    }
    if (result.status === "ungradable") {
      card.classList.add("result-not-graded");
      body.append(decisionBadge(ACTIONS.notGraded, "The photo's quality is too low to grade."),
        reasonList(result.quality.reasons),
        el("p", { className: "todo" }, "Retake the photo of this eye (dilating the pupil may help), then grade it again."));
      return card;
    }
    const action = actionFor(result);
    card.classList.add(`result-${action.key}`);
    body.append(
      el("p", { className: "grade" },
        el("span", { className: "grade-number" }, `Grade ${result.grade}`),
        el("span", { className: "grade-name" }, result.grade_name)),
      el("p", { className: "meaning" }, GRADE_MEANINGS[result.grade] || ""),
      decisionBadge(action, referralWhy(result)),
      el("p", { className: "confidence" },
        `Estimated risk of referable diabetic retinopathy: ${percent(result.p_referable)}`,
        ` · Probability of the grade shown: ${percent(result.confidence)}`),
      el("p", { className: "operating-point-used" }, pointSentence(result)),
      dmeSentence(result),
      el("p", { className: "quality" }, `Image quality: good (${percent(result.quality.score)})`),
      reasonList(result.quality.reasons));
    if (entry.paired) {
      // The service's fellow-eye answer: this eye read together with the other eye's photos (same patient).
      body.append(el("p", { className: "paired" },
        `Read together with the other eye: grade ${entry.paired.grade} (${entry.paired.grade_name}), `
        + `${entry.paired.referable ? "referable" : "not referable"}, probability of referable disease `
        + `${percent(entry.paired.p_referable)}. The decision above is this photo's own.`));
    }
    if (result.explanation) media.append(evidenceFigure(entry, result.explanation));
    return card;
  }

  function patientSummary(patient, entries, items, reference) {
    const who = reference ? `Patient ${reference}` : "This patient (no reference given)";
    const gradedEntries = entries.filter((e) => e.result && e.result.status === "graded");
    let worst = null;
    for (const e of gradedEntries) {
      if (!worst || e.result.grade > worst.result.grade) worst = e;
    }
    const decided = patient && patient.decision !== "cannot_decide";
    const action = (decided && URGENCY_ACTIONS[patient.urgency]) || ACTIONS.undecided;
    const todos = [];
    for (const e of entries) {
      const name = items[e.index].file.name;
      const where = e.eye ? `the ${e.eye} eye` : "this eye";
      if (e.error) todos.push(`Check the file ${name}: it could not be read.`);
      else if (e.result.status === "not_fundus") todos.push(`Check the file ${name}: it is not a retinal photograph.`);
      else if (e.result.status === "ungradable") todos.push(`Retake the photo of ${where} (${name}): it could not be graded.`);
    }
    const eyesSeen = new Set(entries.filter((e) => e.result && e.result.status === "graded").map((e) => e.eye));
    for (const eye of ["right", "left"]) {
      if (!eyesSeen.has(eye) && !entries.some((e) => e.eye === eye)) {
        todos.push(`Photograph the ${eye} eye, or set the eye of its photo above.`);
      }
    }
    const node = el("section", { className: `summary summary-${action.key}`, "aria-labelledby": "summary-title" },
      el("h3", { id: "summary-title" }, who),
      decisionBadge(action, action === ACTIONS.undecided ? "" : "The worse eye decides."));
    if (worst) {
      node.append(el("p", { className: "worst" },
        `Worse eye: ${eyeName(worst.eye || "").toLowerCase()} — grade ${worst.result.grade}, `
        + `${worst.result.grade_name}.`));
    }
    const eyeLines = ["right", "left"].map((eye) => {
      const mine = gradedEntries.filter((e) => e.eye === eye);
      if (!mine.length) return el("li", {}, `${eyeName(eye)}: not graded`);
      const top = mine.reduce((a, b) => (b.result.grade > a.result.grade ? b : a));
      return el("li", {}, `${eyeName(eye)}: grade ${top.result.grade}, ${top.result.grade_name} — ${actionFor(top.result).label.toLowerCase()}`);
    });
    const untagged = gradedEntries.filter((e) => !e.eye);
    if (untagged.length) eyeLines.push(el("li", {}, `Photos with no eye set: ${untagged.length} graded`));
    node.append(el("ul", { className: "eye-lines" }, eyeLines));
    if (todos.length) {
      node.append(el("h4", {}, "To do"), el("ul", { className: "todos" }, todos.map((t) => el("li", {}, t))));
    }
    const sentence = `${who}: ${action.label}. ${action.text}${todos.length ? ` ${todos.join(" ")}` : ""}`;
    return { node, sentence };
  }

  // ---- wiring ------------------------------------------------------------------------------------
  function wire() {
    const input = $("file-input");
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = ""; // choosing the same file again still fires "change"
    });
    const zone = $("dropzone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      addFiles(event.dataTransfer.files);
    });
    // A photo dropped beside the zone must not make the browser navigate away from the results.
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
    $("screening-form").addEventListener("submit", gradeAll);
    $("clear-button").addEventListener("click", clearAll);
    $("print-button").addEventListener("click", () => window.print());
    $("api-key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.apiKey = $("api-key").value.trim();
      sessionStorage.setItem(KEY_STORAGE, state.apiKey);
      $("api-key").value = "";
      connect();
    });
    connect();
  }

  // Exposed for the browser tests only (pure functions, no state).
  window.retinagrade = { guessEye, errorSentence };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", wire);
  else wire();
})();
