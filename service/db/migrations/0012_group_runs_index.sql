-- The running turns of one task group, found at once when its event stream stops working and
-- its runs go back to the ordinary poll schedule (service.db.groups.poll_runs_of).
CREATE INDEX turn_taskgroup_running_idx ON turn (taskgroup_id)
    WHERE status = 'running' AND taskgroup_id IS NOT NULL;
