package reconciler

// Observed is what xenstore says of one device: the toolstack's and the
// frontend's halves, read in one pass.
type Observed struct {
	Present         bool   // the backend directory exists
	Params          string // FORMAT:PATH
	Mode            string // "r" or "w"
	Online          bool
	Backend         State
	FrontendPresent bool
	Frontend        State
	RingPublished   bool // the frontend wrote ring-ref(s) and event-channel
	// Domain0: the frontend is dom0 on a host without Xen, where no
	// kernel frontend exists: its "guest" is the NBD export. On Xen,
	// dom0's own xen-blkfront connects a ring like any guest's.
	Domain0       bool
	LocalFrontend bool // no Xen: the daemon plays this guest's blkfront
	// Export: the worker serves an NBD export too, on a socket that
	// physical-device-path names (what libxl hands QEMU for an HVM
	// guest's emulated disk, and dom0's tools use): every device on Xen,
	// and the export-only dom0 disks without it.
	Export bool
	// Cdrom: device-type is cdrom. Empty params are an empty drive, and
	// new params are a medium change.
	Cdrom            bool
	HotplugConnected bool // hotplug-status = connected
	// HotplugScript: the backend names a `script`, so the toolstack runs a
	// hotplug script once the backend reaches InitWait and waits for it.
	HotplugScript bool
	// Declared: blktap/source is set, the disk is the daemon's own (attach,
	// YAML); no hotplug script runs for it, whatever `script` says.
	Declared bool
	// FrontendError: the frontend published ring keys the backend cannot
	// use (refs, queue count, protocol); fatal, as xenbus_dev_fatal.
	FrontendError string
	QoS           QoS  // the limits the YAML asks for (none for other disks)
	KernelNBD     bool // a domain-0 disk names a kernel nbd device (nbd-device)
	// Request is the oldest operator request (the API's pause, resume,
	// snapshot) waiting for the device, observed with it.
	Request Request
}

// QoS is a worker's I/O limits; zero is unlimited.
type QoS struct {
	IOPS      int64
	Bandwidth int64 // bytes per second
}

// Request is an operator's request for a device.
type Request int

const (
	RequestNone Request = iota
	RequestPause
	RequestResume // with or without a new image
	RequestSnapshot
)

// Adoption is what became of a worker a previous daemon left running.
type Adoption int

const (
	AdoptionNone    Adoption = iota // not adopted, or checked already
	AdoptionMatches                 // it serves what xenstore declares: keep it
	AdoptionStale                   // it serves something else: close it
)

// awaitsHotplug: a toolstack-declared device, whose Connected waits for
// its hotplug script (libxl reacts to InitWait only, then runs it).
func (o Observed) awaitsHotplug() bool { return o.HotplugScript && !o.Declared }

// frontendLost: the frontend's directory or state is gone, or it went
// Unknown, after the device was connected; blkback counts this as Closed.
func (o Observed) frontendLost(a Actual) bool {
	if o.Domain0 || (o.FrontendPresent && o.Frontend != StateUnknown) {
		return false
	}
	return a.Ring || o.Backend == StateConnected || o.Backend == StateClosing || o.Backend == StateClosed
}

// Actual is what the daemon runs for one device.
type Actual struct {
	Worker      bool   // a worker process runs with the image open
	Export      bool   // the worker serves the domain-0 NBD export
	Ring        bool   // the worker serves the guest's ring
	RingError   string // the ring stopped on its own (hostile frontend, I/O error)
	RingLost    string // ... and was torn down; set until a new ring serves the guest
	LF          bool   // the local frontend exists (ring allocated, keys written)
	LFConnected bool   // ... and is connected, its guest view exported
	Failed      string // a terminal error for these params: nothing starts until they change
	Params      string // the params the worker opened
	QoS         QoS    // the limits the worker applies
	KernelNBD   bool   // the kernel nbd device is connected to the export
	Paused      bool   // the worker holds the disk's I/O (a pause request)
	Adopted     Adoption
	// StrayRing: an adopted worker still serves a local ring whose
	// frontend lived in the previous daemon; nobody drives it any more.
	StrayRing bool
	// Exited: the last worker exited on its own, and why; set until a
	// new one starts. WorkerBackoff: the facts its restart's delay is
	// decided from.
	Exited        string
	WorkerBackoff Backoff
	// RingBackoff: the facts the local frontend's restart after RingLost
	// waits on.
	RingBackoff Backoff
}

// Nanos is a span of time in nanoseconds, as time.Duration counts it:
// Plan gets times as facts, it reads no clock.
type Nanos int64

const second Nanos = 1e9

// Backoff is what a restart's delay is decided from: something (a worker,
// the local frontend's ring) stopped on its own and comes back after a
// delay that grows while it keeps stopping at once.
type Backoff struct {
	Served   Nanos // how long it had run since its last start
	LastWait Nanos // the delay that start had waited (0: none, it was no restart)
	Since    Nanos // how long ago it stopped, by the caller's clock
}

// backoffPolicy turns a Backoff into the next delay.
type backoffPolicy struct {
	initial, max Nanos
	// servedFactor: something that ran this many times longer than the
	// delay before its start was serving, not crash-looping; its stop
	// counts as a fresh one (0: only stableAfter counts).
	servedFactor Nanos
}

// stableAfter is how long something must run before its stop counts as a
// fresh one, whatever its last delay.
const stableAfter = 60 * second

var (
	// A worker that crashes at once, again and again, is restarted ever
	// more slowly; one that served for a while starts afresh. Without
	// servedFactor, workers killed every few seconds (an operator's
	// kills, the crash matrix's rounds) came back ever more slowly
	// although each had served between the kills.
	workerRestart = backoffPolicy{initial: second / 2, max: 60 * second, servedFactor: 10}
	// A local ring that breaks again at once is retried ever more slowly.
	ringRestart = backoffPolicy{initial: second, max: 60 * second}
)

// delay is how long after b's stop the restart waits: the initial delay
// for a fresh stop, half as long again as the last one otherwise.
func (p backoffPolicy) delay(b Backoff) Nanos {
	if b.LastWait <= 0 || b.Served > stableAfter || (p.servedFactor > 0 && b.Served > p.servedFactor*b.LastWait) {
		return p.initial
	}
	return min(b.LastWait*3/2, p.max)
}

// ActionKind is one step toward the desired state.
type ActionKind int

const (
	ActStartWorker          ActionKind = iota + 1 // start the worker and open the image
	ActServeExport                                // hand the domain-0 export socket to the worker
	ActBackendInitWait                            // publish features, backend -> InitWait
	ActDom0Connect                                // hotplug keys, disk keys, both halves -> Connected
	ActFrontendInit                               // local frontend: ring, grants, keys -> Initialised
	ActConnectRing                                // the worker maps the ring; disk keys; backend -> Connected
	ActFrontendConnect                            // local frontend starts, guest view exported, -> Connected
	ActBackendClosing                             // backend -> Closing
	ActFrontendClose                              // the daemon's frontend half tears down -> Closed
	ActDisconnectRing                             // the worker drains and unmaps the ring; backend -> Closed
	ActStopWorker                                 // drain, flush, close the image, stop the worker
	ActFrontendFatal                              // the frontend's keys are unusable: error written, backend -> Closing
	ActFrontendRestart                            // the local frontend, Closed, goes back to Initialising to reconnect
	ActAdoptWorker                                // keep a previous daemon's worker: it serves what xenstore declares
	ActResetOrphanRing                            // backend -> Closed, frontend -> Initialising: its local frontend is gone
	ActApplyQoS                                   // give the worker the desired limits, live
	ActAwaitRestart                               // the worker exited; its restart waits Action.Wait more
	ActRestartWorker                              // start a new worker after one exited, Action.Wait after
	ActAttachKernelNBD                            // connect the kernel nbd device to the export
	ActDetachKernelNBD                            // disconnect the kernel nbd device
	ActPause                                      // the worker holds I/O, flushes and closes the image
	ActResume                                     // the worker reopens the image (or a new one) and releases I/O
	ActSnapshot                                   // pause, overlay over the image, resume on the overlay
	ActRefuseRequest                              // answer the request: the device has no worker to do it
	ActDisconnectStrayRing                        // an adopted worker lets go of a ring nobody drives any more
	ActAwaitFrontendRestart                       // the local frontend's restart waits Action.Wait more
)

var actionNames = map[ActionKind]string{
	ActStartWorker: "start-worker", ActServeExport: "serve-export",
	ActBackendInitWait: "backend-initwait", ActDom0Connect: "dom0-connect",
	ActFrontendInit: "frontend-init", ActConnectRing: "connect-ring",
	ActFrontendConnect: "frontend-connect", ActBackendClosing: "backend-closing",
	ActFrontendClose: "frontend-close", ActDisconnectRing: "disconnect-ring",
	ActStopWorker: "stop-worker", ActFrontendFatal: "frontend-fatal",
	ActFrontendRestart: "frontend-restart", ActAdoptWorker: "adopt-worker",
	ActResetOrphanRing: "reset-orphan-ring", ActApplyQoS: "apply-qos",
	ActAwaitRestart: "await-restart", ActRestartWorker: "restart-worker",
	ActAttachKernelNBD: "attach-kernel-nbd", ActDetachKernelNBD: "detach-kernel-nbd",
	ActPause: "pause", ActResume: "resume", ActSnapshot: "snapshot",
	ActRefuseRequest: "refuse-request", ActDisconnectStrayRing: "disconnect-stray-ring",
	ActAwaitFrontendRestart: "await-frontend-restart",
}

func (k ActionKind) String() string { return actionNames[k] }

// Action is one step with the reason it is needed.
type Action struct {
	Kind   ActionKind
	Reason string
	// Wait: for the await actions, how much longer to wait; for the
	// restarts, the delay the restart waited (the next delay grows
	// from it).
	Wait Nanos
}

func (a Action) String() string { return a.Kind.String() + ": " + a.Reason }

// Plan returns the steps that move one device from what runs (a) toward
// what is asked of it (o: what xenstore declares, the YAML's limits, the
// operator's requests), in order. It is pure: the same input gives
// the same plan. The caller applies the steps, observes again and plans
// again until the plan is empty; each step's effect is visible to the next
// observation, so Plan only ever looks one handshake step ahead.
func Plan(o Observed, a Actual) []Action {
	return planRequest(o, a, planDevice(o, a))
}

// planDevice is Plan without the operator's requests.
func planDevice(o Observed, a Actual) []Action {
	if !o.Present {
		return planRemoved(a)
	}
	switch a.Adopted {
	case AdoptionStale:
		return []Action{{Kind: ActStopWorker, Reason: "the adopted worker serves something else than xenstore declares"}}
	case AdoptionMatches:
		return []Action{{Kind: ActAdoptWorker, Reason: "the adopted worker serves what xenstore declares"}}
	}
	if a.StrayRing && a.Worker {
		// Before anything maps a ring again: the worker serves one
		// ring at a time, and this one's grants died with the old
		// frontend.
		return []Action{{Kind: ActDisconnectStrayRing, Reason: "the adopted worker serves a ring whose local frontend lived in the previous daemon"}}
	}
	if a.KernelNBD && !a.Worker {
		// Its connection was to the worker that is gone; a new one
		// connects it again once it serves the export.
		return []Action{{Kind: ActDetachKernelNBD, Reason: "the worker it was connected to is gone"}}
	}
	if orphanRing(o, a) {
		// Its grants died with the old frontend: mapping them again
		// cannot work, so the guest starts the handshake over.
		return []Action{{Kind: ActResetOrphanRing, Reason: "the local frontend of this guest is gone (it lived in a previous daemon)"}}
	}
	lost := o.frontendLost(a)
	closing := !o.Online || o.Backend == StateClosing || o.Backend == StateClosed ||
		o.Frontend == StateClosing || o.Frontend == StateClosed || a.RingError != "" || lost
	// A frontend that went back to Initialising after Closed asks to
	// reconnect (xenbus.h): the backend starts over from InitWait.
	reconnect := o.Online && o.Backend == StateClosed && a.RingError == "" &&
		(o.Frontend == StateInitialising || o.Frontend == StateInitWait)
	var acts []Action
	if closing && !reconnect {
		acts = planClosing(o, a, lost)
	} else {
		acts = planHandshake(o, a, reconnect)
	}
	if len(acts) > 0 {
		return acts
	}
	return planSettled(o, a)
}

// orphanRing: a guest the daemon plays the frontend of says it is
// Initialised or Connected, but no local frontend exists, and no ring is
// served: the frontend lived in a previous daemon.
func orphanRing(o Observed, a Actual) bool {
	return o.Online && o.LocalFrontend && !a.LF && !a.Ring && o.FrontendPresent &&
		(o.Frontend == StateInitialised || o.Frontend == StateConnected) &&
		(o.Backend == StateConnected || o.Backend == StateInitWait)
}

// planSettled: the handshake is done (or nothing can move); what is left
// is what the disk's users asked for besides it.
func planSettled(o Observed, a Actual) []Action {
	var acts actions
	if a.Worker && o.QoS != a.QoS {
		acts.add(ActApplyQoS, "the desired I/O limits differ from the worker's")
	}
	switch {
	case a.KernelNBD && !o.KernelNBD:
		acts.add(ActDetachKernelNBD, "nbd-device is no longer asked for")
	case o.KernelNBD && !a.KernelNBD && o.Domain0 && a.Export && o.Backend == StateConnected:
		acts.add(ActAttachKernelNBD, "the disk is connected and nbd-device asks for a kernel device")
	}
	return acts
}

// planRequest puts the answer to the operator's oldest request first:
// the worker does it, or, with no worker to do it (or one about to stop),
// the request is refused.
func planRequest(o Observed, a Actual, acts []Action) []Action {
	if o.Request == RequestNone {
		return acts
	}
	stopping := false
	for _, act := range acts {
		stopping = stopping || act.Kind == ActStopWorker
	}
	first := Action{Kind: ActRefuseRequest, Reason: "the device has no running worker"}
	if a.Worker && !stopping {
		first = map[Request]Action{
			RequestPause:    {Kind: ActPause, Reason: "the operator asked to pause the disk"},
			RequestResume:   {Kind: ActResume, Reason: "the operator asked to resume the disk"},
			RequestSnapshot: {Kind: ActSnapshot, Reason: "the operator asked for a snapshot"},
		}[o.Request]
	}
	return append([]Action{first}, acts...)
}

// actions collects a plan's steps.
type actions []Action

func (acts *actions) add(k ActionKind, why string) {
	*acts = append(*acts, Action{Kind: k, Reason: why})
}

// planRemoved: the toolstack removed the device; everything is released.
func planRemoved(a Actual) []Action {
	var acts actions
	if a.KernelNBD {
		acts.add(ActDetachKernelNBD, "backend directory removed")
	}
	if a.LF || a.LFConnected {
		acts.add(ActFrontendClose, "backend directory removed")
	}
	if a.Ring {
		acts.add(ActDisconnectRing, "backend directory removed")
	}
	if a.Worker {
		acts.add(ActStopWorker, "backend directory removed")
	}
	return acts
}

// planClosing takes a device that is going away, or whose frontend went
// (lost), down the Closing/Closed handshake.
func planClosing(o Observed, a Actual, lost bool) []Action {
	var acts actions
	add := acts.add
	ownsFrontend := o.Domain0 || o.LocalFrontend
	switch {
	case a.RingError != "" && o.Backend != StateClosing && o.Backend != StateClosed:
		add(ActBackendClosing, "ring stopped: "+a.RingError)
	case (o.Frontend == StateClosing || o.Frontend == StateClosed) &&
		o.Backend != StateClosing && o.Backend != StateClosed:
		add(ActBackendClosing, "frontend is "+o.Frontend.String())
	case !o.Online && o.Backend != StateClosing && o.Backend != StateClosed:
		add(ActBackendClosing, "toolstack set online to 0")
	case lost && !a.Ring && o.Backend == StateConnected:
		add(ActDisconnectRing, "frontend is gone") // nothing mapped; backend -> Closed
	}
	if a.KernelNBD && (o.Backend == StateClosing || o.Backend == StateClosed || len(acts) > 0) {
		add(ActDetachKernelNBD, "the disk is closing")
	}
	if ownsFrontend && (a.LF || a.LFConnected || (o.FrontendPresent && o.Frontend != StateClosed)) &&
		(o.Backend == StateClosing || o.Backend == StateClosed || len(acts) > 0) {
		add(ActFrontendClose, "backend is closing; the daemon's frontend closes")
	}
	frontendGone := o.Frontend == StateClosed || !o.FrontendPresent || o.Frontend == StateUnknown
	if frontendGone && (a.Ring || o.Backend == StateClosing) {
		add(ActDisconnectRing, "frontend is "+o.Frontend.String())
	}
	if !o.Online && a.Worker && (o.Backend == StateClosed || (frontendGone && !a.Ring)) {
		add(ActStopWorker, "device is offline and closed")
	} else if lost && o.Declared && a.Worker && !a.Ring && o.Backend == StateClosed {
		// No toolstack will remove a disk the daemon declared: the
		// guest is gone, so is the reason to keep the image open.
		add(ActStopWorker, "frontend is gone and nobody else will remove the device")
	}
	if o.LocalFrontend && o.Online && o.Backend == StateClosed && o.Frontend == StateClosed &&
		a.RingLost != "" && !a.Ring && !a.LF && !a.LFConnected && a.RingError == "" && a.Failed == "" {
		// Nobody but the daemon plays this guest's blkfront, and it
		// closed only because the ring broke: it does what a blkfront
		// does after Closed while the disk is still wanted, starts
		// over, and the handshake reconnects. (A guest that went
		// away is not brought back.)
		acts = append(acts, restartAfter(ringRestart, a.RingBackoff,
			Action{Kind: ActAwaitFrontendRestart, Reason: "the ring was lost (" + a.RingLost + "); the local frontend's restart waits for the backoff"},
			Action{Kind: ActFrontendRestart, Reason: "the ring was lost (" + a.RingLost + "); the local frontend starts over"}))
	}
	return acts
}

// restartAfter is the restart, once b's delay under p ran out, or the wait
// for it.
func restartAfter(p backoffPolicy, b Backoff, await, restart Action) Action {
	wait := p.delay(b)
	if b.Since < wait {
		await.Wait = wait - b.Since
		return await
	}
	restart.Wait = wait
	return restart
}

// planHandshake brings a device that is wanted up to Connected, one
// handshake step at a time.
func planHandshake(o Observed, a Actual, reconnect bool) []Action {
	var acts actions
	add := acts.add
	if a.Failed != "" {
		// libxl runs the hotplug script only once the backend is
		// InitWait; the script is what reports the failure to it.
		if o.awaitsHotplug() && (o.Backend == StateUnknown || o.Backend == StateInitialising || reconnect) {
			add(ActBackendInitWait, "start failed; InitWait lets the hotplug script report it")
		}
		return acts // terminal for these params; status already says why
	}
	if o.awaitsHotplug() && (o.Backend == StateUnknown || o.Backend == StateInitialising || reconnect) {
		// libxl gives a backend 10 s (LIBXL_INIT_TIMEOUT) to reach
		// InitWait, and blkback gets there at probe, before it opens
		// anything. Opening an image can take longer on a loaded host;
		// the hotplug script, which libxl runs next and gives 40 s,
		// waits for it instead.
		add(ActBackendInitWait, "backend is "+o.Backend.String()+"; the toolstack waits for InitWait before anything else")
		return acts
	}
	if a.Worker && o.Cdrom && a.Params != o.Params {
		// The toolstack inserted or ejected a disc: a new worker opens
		// it and takes the ring over, as after a crash, and the frontend
		// reads the new size when the backend says Connected again.
		add(ActStopWorker, "the medium changed")
		return acts
	}
	if !a.Worker {
		return append(acts, startWorker(a))
	}
	return planConnect(o, a, reconnect)
}

// startWorker: a worker that exited on its own is restarted once its
// backoff ran out, so a worker that dies at once does not spin.
func startWorker(a Actual) Action {
	if a.Exited == "" {
		return Action{Kind: ActStartWorker, Reason: "no worker serves the disk"}
	}
	return restartAfter(workerRestart, a.WorkerBackoff,
		Action{Kind: ActAwaitRestart, Reason: "the worker exited (" + a.Exited + "); its restart waits for the backoff"},
		Action{Kind: ActRestartWorker, Reason: "the worker exited (" + a.Exited + ")"})
}

// planConnect takes a device whose worker runs through the handshake.
func planConnect(o Observed, a Actual, reconnect bool) []Action {
	var acts actions
	add := acts.add
	if o.Export && !a.Export {
		add(ActServeExport, "no NBD export for physical-device-path")
	}
	if o.Backend == StateUnknown || o.Backend == StateInitialising || reconnect {
		add(ActBackendInitWait, "backend is "+o.Backend.String())
		return acts
	}
	if o.awaitsHotplug() && !o.HotplugConnected {
		return acts // Connected only after the toolstack's hotplug script reported
	}
	if o.Domain0 {
		if o.Backend != StateConnected || o.Frontend != StateConnected || !o.HotplugConnected {
			add(ActDom0Connect, "export ready; domain 0 has no ring")
		}
		return acts
	}
	if o.LocalFrontend && !a.LF && o.Backend == StateInitWait &&
		(o.Frontend == StateInitialising || o.Frontend == StateUnknown) {
		add(ActFrontendInit, "backend is InitWait; the local frontend allocates the ring")
		return acts
	}
	if (o.Frontend == StateInitialised || o.Frontend == StateConnected) &&
		(!a.Ring || o.Backend != StateConnected) {
		if o.FrontendError != "" {
			add(ActFrontendFatal, "frontend: "+o.FrontendError)
		} else if o.RingPublished {
			add(ActConnectRing, "frontend is "+o.Frontend.String()+" with its ring published")
		}
		return acts
	}
	if o.LocalFrontend && a.Ring && o.Backend == StateConnected && !a.LFConnected {
		add(ActFrontendConnect, "backend is Connected")
	}
	return acts
}
