package reconciler

import "strings"

// Model is what each action does to a device, for dry runs and scenario
// transcripts: the effect apply() has on xenstore and on the worker,
// without doing it.
type Model struct {
	o         Observed
	a         Actual
	failStart string
	// failedParams are the params a.Failed happened with.
	failedParams string
}

// NewModel starts a model of a device as a toolstack declares it.
func NewModel(domain0, localFrontend bool) *Model {
	return &Model{o: Observed{Present: true, Online: true, Backend: StateInitialising,
		FrontendPresent: true, Frontend: StateInitialising, Domain0: domain0, LocalFrontend: localFrontend,
		Export: domain0 || !localFrontend}}
}

// Converge plans and applies until the plan is empty (at most 24 rounds)
// and returns every action taken, in order.
func (m *Model) Converge() []Action {
	var all []Action
	for range 24 {
		m.fold()
		acts := Plan(m.o, m.a)
		if len(acts) == 0 {
			break
		}
		for _, a := range acts {
			all = append(all, a)
			m.apply(a)
		}
	}
	return all
}

// State summarises the model: xenstore states and what runs.
func (m *Model) State() string { return m.state() }

// fold does what the daemon does with an observation before it plans
// (foldObservation): a terminal failure stands only for the params it
// happened with; new params, or none once the device is removed, try again.
func (m *Model) fold() {
	if m.a.Failed != "" && m.failedParams != m.o.Params {
		m.a.Failed, m.failedParams = "", ""
	}
}

func (m *Model) apply(act Action) {
	o, a := &m.o, &m.a
	switch act.Kind {
	case ActStartWorker:
		if m.failStart != "" {
			a.Failed, m.failedParams, m.failStart = m.failStart, o.Params, ""
			return
		}
		a.Worker, a.Params, a.QoS, a.Paused, a.Exited = true, o.Params, QoS{}, false, ""
		a.WorkerBackoff.LastWait = 0 // ActRestartWorker sets it
	case ActServeExport:
		a.Export = true
	case ActBackendInitWait:
		o.Backend = StateInitWait
	case ActDom0Connect:
		o.Backend, o.Frontend, o.HotplugConnected = StateConnected, StateConnected, true
	case ActFrontendInit:
		a.LF, o.Frontend, o.RingPublished = true, StateInitialised, true
	case ActConnectRing:
		a.Ring, o.Backend = true, StateConnected
		if !o.LocalFrontend {
			a.RingLost = ""
		}
	case ActFrontendConnect:
		a.LFConnected, o.Frontend, a.RingLost = true, StateConnected, ""
	case ActBackendClosing, ActFrontendFatal:
		o.Backend = StateClosing
	case ActFrontendClose:
		a.LF, a.LFConnected = false, false
		if o.FrontendPresent {
			o.Frontend = StateClosed
		}
	case ActFrontendRestart:
		o.Frontend, a.RingBackoff.LastWait = StateInitialising, act.Wait
	case ActDisconnectRing:
		if a.RingError != "" {
			// The frontend served no time at all since its restart:
			// the next one waits longer.
			a.RingLost, a.RingBackoff.Served, a.RingBackoff.Since = a.RingError, 0, 0
		}
		a.Ring, a.RingError = false, ""
		if o.Present {
			o.Backend = StateClosed
		}
	case ActStopWorker:
		a.Worker, a.Export, a.Ring, a.Params, a.RingError, a.RingLost = false, false, false, "", "", ""
		a.Adopted, a.QoS, a.Paused, a.StrayRing = AdoptionNone, QoS{}, false, false
	default:
		m.applyMore(act)
	}
}

// applyMore models the actions beyond the handshake's.
func (m *Model) applyMore(act Action) {
	o, a := &m.o, &m.a
	switch act.Kind {
	case ActAdoptWorker:
		a.Adopted, a.Params = AdoptionNone, o.Params
	case ActResetOrphanRing:
		o.Backend, o.Frontend = StateClosed, StateInitialising
	case ActApplyQoS:
		a.QoS = o.QoS
	case ActAwaitRestart:
		a.WorkerBackoff.Since += act.Wait // the backoff runs out
	case ActAwaitFrontendRestart:
		a.RingBackoff.Since += act.Wait
	case ActRestartWorker:
		m.apply(Action{Kind: ActStartWorker})
		if a.Worker {
			a.WorkerBackoff.LastWait = act.Wait
		}
	case ActDisconnectStrayRing:
		a.StrayRing = false
	case ActAttachKernelNBD:
		a.KernelNBD = true
	case ActDetachKernelNBD:
		a.KernelNBD = false
	case ActPause, ActResume:
		a.Paused, o.Request = act.Kind == ActPause, RequestNone
	case ActSnapshot:
		a.Paused, o.Request = false, RequestNone
		o.Params += ".overlay" // the effect records the overlay in params
		a.Params = o.Params
	case ActRefuseRequest:
		o.Request = RequestNone
	}
}

func (m *Model) state() string {
	var parts []string
	if !m.o.Present {
		parts = append(parts, "removed")
	} else {
		parts = append(parts, "backend="+m.o.Backend.String(), "frontend="+m.o.Frontend.String())
		if !m.o.Online {
			parts = append(parts, "offline")
		}
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{m.a.Worker, "worker"}, {m.a.Export, "export"}, {m.a.Ring, "ring"}, {m.a.LF, "local-frontend"}, {m.a.LFConnected, "guest-view"},
		{m.a.KernelNBD, "kernel-nbd"}, {m.a.Paused, "paused"}} {
		if f.on {
			parts = append(parts, f.name)
		}
	}
	if m.a.Failed != "" {
		parts = append(parts, "failed("+m.a.Failed+")")
	}
	return strings.Join(parts, " ")
}
